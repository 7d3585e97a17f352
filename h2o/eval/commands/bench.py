"""`h2o bench`: the results table. PPL, speed and memory per policy, on the same texts and prompt."""

from __future__ import annotations

import socket

import torch

from .. import answers, checkpoints, data, report
from ..options import BENCH_POLICIES, RANDOM_MODEL_ALLOCATION
from ..session import unique_policies
from ..ppl import check_eviction_in_force, text_losses
from ..runners import canonical, describe, is_press, ppl_comparable
from ..speed import measure_speed

NAME = "bench"
HELP = "the results table: PPL, speed and memory per policy"
TABLE = {
    "configuration": "Configuration",
    "wikitext_ppl": "Wikitext PPL",
    "pg19_ppl": "PG-19 PPL",
    "text_ppl": "Text PPL",
    "gap_closed": "Gap closed",
    "passkey_kept": "Passkey kept",
    "total_time_s": "Total Time (s)",
    "avg_attn_ms": "Avg Attn (ms)",
    "ttft_s": "TTFT (s)",
    "ttft_over_full": "TTFT x full",
    "tpot_median_ms": "TPOT med (ms)",
    "tpot_over_full": "TPOT x full",
    "throughput_tok_s": "Throughput (tok/s)",
    "peak_mem_mib": "Peak Mem (MiB)",
    "kv_mib": "KV MiB",
}


def _formable(policies: list[str], model: str) -> list[str]:
    """The default policies whose head and layer budgets can be formed on the model's compressed KV heads (Gemma 3
    270M has 3: a tenth of them at 4x the budget leaves the others nothing); any other is left out, and said so."""
    from h2o.models import compressed_layers, kv_heads
    from h2o.policies import parse
    from h2o.policies.allocation import Allocated

    allocated = {p: parse(p) for p in policies if isinstance(parse(p), Allocated)}
    if not allocated:
        return policies
    config = checkpoints.load_config(model)
    shape = (len(compressed_layers(config)), kv_heads(config))
    left_out = set()
    for name, rule in allocated.items():
        try:
            rule.plan(*shape, {score: torch.ones(shape) for score in ("retrieval", "induction", "ablation", "reconstruction")})
        except ValueError as e:
            print(f"note: the default {name} is left out on {model}: {e}")
            left_out.add(name)
    return [p for p in policies if p not in left_out]


def check(args) -> dict:
    if args.policies is BENCH_POLICIES:  # not given: on a random-weight model, induction heads for retrieval heads
        args.policies = [RANDOM_MODEL_ALLOCATION if p.startswith("retrieval_") and args.model.startswith("random:")
                         else p for p in BENCH_POLICIES]
        args.policies = _formable(args.policies, args.model)
    names = ["full"] + [p for p in args.policies if p != "full"]
    policies = unique_policies(names, canonical(names, args.score))
    if any(is_press(p) for p in policies) and args.positions != "original":
        raise ValueError("kvpress presses keep the original positions: use --positions original with kvpress: names")
    if args.model.startswith("random:"):
        needs = [p for p in policies if getattr(getattr(describe(p), "allocation", None), "score", None) == "retrieval"]
        if needs:
            raise ValueError(f"{needs[0]}: ranks heads by the retrieval score, which needs a tokenizer; {args.model} "
                             "has random weights and none: give --policies, e.g. with induction_0.1_4+h2o_4_32_256")
    budgets = [describe(p).budget for p in policies if describe(p).budget is not None]
    if budgets and not args.no_ppl and args.ppl_tokens <= max(budgets) + args.buffer:
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} never outgrows the largest budget + buffer "
                         f"({max(budgets)} + {args.buffer}): no eviction would be measured")
    if args.context < 1 or args.new_tokens < 2 or args.repeats < 1 or args.batch < 1 or args.ppl_chunk < 1:
        raise ValueError("--context, --repeats, --batch and --ppl-chunk must be >= 1 and --new-tokens >= 2")
    texts = {}  # {column: (text, source)}; any missing one is an error, never replaced
    for corpus in args.corpus:
        texts[corpus] = data.load_document(corpus, args.pg19_book if corpus == "pg19" else None, args.data_dir)
    if args.add_text_file:
        texts["text"] = data.load_text_file(args.add_text_file)
    if args.cases < 0:
        raise ValueError(f"--cases must be >= 0, got {args.cases}")
    if args.context_chunk < 1:
        raise ValueError(f"--context-chunk must be >= 1, got {args.context_chunk}")
    args.protocols = list(dict.fromkeys(args.protocols))
    if min(args.lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {min(args.lengths)}")
    if args.cases and not args.model.startswith("random:"):
        answers.check_passkey(policies, args.lengths, args.buffer, args.model, args.positions, tuple(args.tasks),
                              tuple(args.phrasings))
    return {"policies": policies, "texts": texts}


def run(session, plan) -> int:
    args, policies, texts = session.args, plan["policies"], plan["texts"]
    model, tokenizer = session.load_model(local=True)  # speed is measured here, in one process, even with --ray
    progress = not args.no_progress

    ppl, ppl_sources, not_comparable = {}, {}, []
    notes = [session.model_line]
    if tokenizer is None:
        print(f"note: {args.model} has random weights: perplexity is not measured, only speed and memory")
    elif not args.no_ppl:
        chunk = 1 if args.ppl_mode == "stream" else args.ppl_chunk
        measured = []
        for policy in policies:
            why = ppl_comparable(policy)
            if why:
                not_comparable.append(why)
            else:
                measured.append(policy)
        ids = {name: data.tokenize(tokenizer, text, args.ppl_tokens, args.bos) for name, (text, _) in texts.items()}
        results = text_losses(session.run_units, ids, measured, desc="PPL", chunk=chunk, prefill=chunk,
                              positions=args.positions, buffer=args.buffer)
        for policy in measured:
            ppl[policy] = {name: results[name, policy] for name in texts}
            if policy != "full":
                for name in texts:
                    check_eviction_in_force(ppl["full"][name], ppl[policy][name])
        ppl_sources = {name: source for name, (_, source) in texts.items()}

    passkey, kept_notes = {}, []  # {(task, protocol): {policy: summary row}}
    if tokenizer is not None and args.cases:
        haystacks = {name: text for name, (text, _) in texts.items()}
        for protocol in args.protocols:
            kept, note, paired = answers.tasks_kept(session, policies, haystacks, args.tasks, args.cases,
                                                    args.lengths, args.phrasings, protocol, args.context_chunk)
            passkey.update({(task, protocol): k for task, k in kept.items()})
            kept_notes.append("; ".join([note] + [answers.supported_note(
                [c for c in paired if c["task"] == t], f"{t} kept ({protocol})") for t in args.tasks]))

    if tokenizer is None or "wikitext" not in texts:
        prompt = data.random_ids(model.config.vocab_size, args.context, args.batch)
        prompt_source = "random ids"
    else:
        prompt = data.tokenize(tokenizer, texts["wikitext"][0], args.context, args.bos).expand(args.batch, -1)
        prompt_source = f"first {args.context} tokens of {texts['wikitext'][1]}"
    speed = measure_speed(model, prompt, policies, new_tokens=args.new_tokens, repeats=args.repeats,
                          positions=args.positions, buffer=args.buffer, progress=progress)

    # what every row was measured under (README: the PPL mode is labelled in every output)
    setup = {"ppl_mode": args.ppl_mode if ppl else "not measured",
             "ppl_chunk": (1 if args.ppl_mode == "stream" else args.ppl_chunk) if ppl else None,
             "ppl_tokens": args.ppl_tokens if ppl else None,
             "positions": args.positions, "buffer": args.buffer}
    gaps, gap_notes = gaps_closed(ppl, policies)
    full_speed = speed["full"]
    rows = []
    for policy in policies:
        s = speed[policy]
        row = {"configuration": policy}
        for name in texts if policy in ppl else ():
            row[f"{name}_ppl"] = ppl[policy][name].ppl()
            row[f"{name}_ppl_after_eviction"] = ppl[policy][name].ppl(after_eviction=True)
        if ppl and policy not in ppl:  # measured for the others, not comparable for this one
            row.update({f"{name}_ppl": "n/c" for name in texts})
        if policy in gaps:
            row.update(gaps[policy])
        for (task, protocol), kept in passkey.items():
            k, column = kept[policy], kept_column(task, protocol)
            row[column] = answers.kept_text(k)  # n/c: never evicted, not scored
            row[f"{column}_share"] = k["kept_share"]
            row[f"{column}_low"], row[f"{column}_high"] = k["kept_low"], k["kept_high"]
        row.update({
            "total_time_s": s.total_s, "avg_attn_ms": s.attn_ms_per_step, "ttft_s": s.ttft,
            "ttft_over_full": s.ttft / full_speed.ttft,
            "tpot_median_ms": 1000 * s.tpot_median, "tpot_min_ms": 1000 * s.tpot_min,
            "tpot_over_full": s.tpot_median / full_speed.tpot_median,
            "tpot_min_over_full": s.tpot_min / full_speed.tpot_min,
            "throughput_tok_s": s.throughput, "peak_mem_mib": s.peak_mem_bytes / report.MIB,
            "peak_mem_kind": s.peak_mem_kind, "kv_mib": s.kv_bytes / report.MIB,
            **setup,
        })
        rows.append(row)

    table = dict(TABLE)
    at = list(table).index("passkey_kept")
    several = len(args.protocols) > 1
    kept_columns = {kept_column(t, p): f"{'Passkey' if t == 'passkey' else t} kept" + (f" ({p})" if several else "")
                    for t, p in passkey}
    table = {**dict(list(table.items())[:at]), **kept_columns, **dict(list(table.items())[at + 1:])}
    columns = {k: v for k, v in table.items() if k == "configuration" or any(k in r for r in rows)}
    mode = "token by token" if args.ppl_mode == "stream" else f"chunked, {args.ppl_chunk} tokens per forward"
    notes += [
        f"PPL: {args.ppl_tokens} tokens per text, {mode}, BOS {'on' if args.bos else 'off'}; texts: "
        + "; ".join(f"{k}={v}" for k, v in ppl_sources.items()) if ppl else "PPL: not measured",
        f"speed: prompt = {prompt_source} x batch {args.batch}; {args.new_tokens} new tokens, {args.repeats} "
        "interleaved repeats; TPOT median (min in CSV/JSON); Avg Attn = time in the attention modules per decode "
        f"step, all layers; Peak Mem = {rows[0]['peak_mem_kind']}; KV MiB = exact cache bytes at the end",
    ]
    notes += gap_notes + kept_notes
    notes.append("TTFT x full, TPOT x full: the policy's TTFT and median TPOT over the full cache's, measured "
                 "interleaved in this run (TPOT min over min in CSV/JSON: tpot_min_over_full)")
    notes += [f"n/c (not comparable): {why}" for why in not_comparable]
    if any(v == "n/c" for r in rows for k, v in r.items() if k.endswith("_kept")):
        notes.append("n/c in a kept column: the policy never evicted while the prompts were fed (a decoding press "
                     "compresses only after the prefill), so its answers say nothing about compression")
    for policy, per_text in ppl.items():
        notes += [f"{policy} on {name}: {note}" for name, result in per_text.items() for note in result.notes]
    if args.ray is not None:
        notes.append(f"speed and memory measured in one process on the driver ({socket.gethostname()}, "
                     f"{session.info['device']}), every configuration interleaved there; PPL and kept columns "
                     "computed as units on the Ray workers")
    session.write_csv("bench.csv", rows)
    session.write_json("bench.json", ppl_mode=mode, rows=rows, notes=notes)
    setup_line = (f"PPL {mode}, {args.ppl_tokens} tokens per text" if ppl else "PPL not measured") + \
        f"; positions {args.positions}, lazy buffer {args.buffer}; speed after a {args.context}-token prompt"
    session.plot("bench.png", plot(rows, texts if ppl else {}, session.info["name"], args.context, setup_line))
    return session.finish([report.format_table(rows, columns)], notes)


def kept_column(task: str, protocol: str) -> str:
    """The kept column of a task under a protocol: `passkey_kept` (question-aware, as before), `passkey_kept_streaming`."""
    return f"{task}_kept" if protocol == "question-aware" else f"{task}_kept_{protocol.replace('-', '_')}"


def gaps_closed(ppl: dict, policies: list[str]) -> tuple[dict, list[str]]:
    """Each measured policy's perplexity gap closed on each text against StreamingLLM at its budget, when that was
    measured in the run: (StreamingLLM's PPL - the policy's) / (StreamingLLM's - the full cache's), 1 = the full
    cache's perplexity, 0 = StreamingLLM's, < 0 worse, with its paired block-bootstrap 95% interval
    (`h2o.eval.stats`); none where StreamingLLM is within the bootstrap's noise of the full cache (no gap to close).
    ({policy: {<text>_gap_closed, <text>_gap_interval, ..., gap_closed: the worst over the texts}}, notes)."""
    from .. import stats

    if "full" not in ppl:
        return {}, []
    streaming = {describe(p).budget: p for p in ppl if p.startswith("streaming_")}
    out, notes, without = {}, [], []
    for policy in ppl:
        if policy == "full" or policy in streaming.values():
            continue
        reference = streaming.get(describe(policy).budget)
        if reference is None:
            without.append(policy)
            continue
        row, worst = {}, None
        for text, result in ppl[policy].items():
            s, f = ppl[reference][text], ppl["full"][text]
            if not stats.gap_supported(s.losses, f.losses):
                row[f"{text}_gap_closed"], row[f"{text}_gap_interval"] = None, "no gap"
                notes.append(f"{policy} on {text}: {reference}'s perplexity is within the block bootstrap's noise of "
                             "the full cache's: no gap to close")
                continue
            gap = stats.gap_closed(result.ppl(), s.ppl(), f.ppl())
            row[f"{text}_gap_closed"] = gap
            row[f"{text}_gap_interval"] = stats.interval_text(stats.gap_closed_interval(result.losses, s.losses, f.losses))
            worst = gap if worst is None else min(worst, gap)
        row["gap_closed"] = worst
        row["gap_reference"] = reference
        out[policy] = row
    if out:
        notes.insert(0, "Gap closed: the perplexity gap to the full cache closed against StreamingLLM at the same budget "
                        "(1 = full, 0 = StreamingLLM, < 0 worse), the worst over the texts; each text's, with its paired "
                        "block-bootstrap 95% interval, in CSV/JSON (<text>_gap_closed, <text>_gap_interval)")
    if without:
        notes.append(f"no gap closed for {', '.join(without)}: no StreamingLLM policy of the same budget in this run")
    return out, notes


FAMILY_COLORS = {"full": "#7f7f7f", "streaming": "#1f77b4", "h2o": "#d62728", "other": "#2ca02c",
                 "kvpress": "#9467bd"}
FAMILY_LABELS = {"full": "full cache", "streaming": "StreamingLLM", "h2o": "H2O", "other": "other (ours)",
                 "kvpress": "kvpress presses"}


def family(name: str) -> str:
    """The plot's colour group of a configuration: full, streaming, h2o or other."""
    if name == "full":
        return "full"
    if is_press(name):
        return "kvpress"
    return next((f for f in ("streaming", "h2o") if name.startswith(f + "_")), "other")


def zoom(ax, values, margin: float = 0.15) -> None:
    """y limits around the data (not from 0), so that differences between policies show."""
    finite = [v for v in values if v == v and v not in (float("inf"), float("-inf"))]
    if not finite:
        return
    low, high = min(finite), max(finite)
    pad = (high - low) * margin or abs(high) * 0.05 or 1.0
    ax.set_ylim(low - pad, high + pad)


def plot(rows, texts, model_name, context, setup: str | None = None):
    """One panel per PPL text (y zoomed to the data), TPOT (median bars, min marked) and KV MiB;
    a colour per policy family, with a legend; the title says the model and the measurement setup."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = report.pyplot()
    names = [r["configuration"] for r in rows]
    colors = [FAMILY_COLORS[family(n)] for n in names]
    x = range(len(names))
    panels = [(f"{t}_ppl", f"{t} PPL (lower is better; y axis zoomed)") for t in texts]
    panels += [("tpot_median_ms", f"TPOT after a {context}-token prompt, ms"), ("kv_mib", "KV cache, MiB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [v if isinstance(v, (int, float)) else float("nan") for v in (r.get(key) for r in rows)]
        bars = ax.bar(x, values, color=colors)
        ax.bar_label(bars, fmt="%.2f" if key.endswith("_ppl") else "%.1f", fontsize=7)
        if key.endswith("_ppl"):
            zoom(ax, values)
        elif key == "tpot_median_ms":
            mins = [r.get("tpot_min_ms", float("nan")) for r in rows]
            ax.scatter(x, mins, marker="_", s=300, linewidths=2, color="black", zorder=3)
            ax.set_ylim(0, max([v for v in values + mins if v == v] or [1]) * 1.15)
            title += "\nbars: median; black line: min"
        else:
            ax.set_ylim(0, max([v for v in values if v == v] or [1]) * 1.12)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    present = list(dict.fromkeys(family(n) for n in names))
    handles = [Patch(color=FAMILY_COLORS[f], label=FAMILY_LABELS[f]) for f in present]
    handles.append(Line2D([], [], color="black", marker="_", linestyle="none", markersize=12, label="TPOT min"))
    fig.suptitle(f"h2o bench: {model_name}" + (f"\n{setup}" if setup else ""), fontsize=11, y=0.99)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.89), fontsize=8, ncol=len(handles),
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.86))
    return fig
