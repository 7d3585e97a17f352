"""`h2o sweep`: PPL vs cache budget per policy family, and decode throughput vs batch size.

PPL: the full cache once, then every family at every budget, on the same token ids, through
`h2o.eval.ppl.token_losses` (eviction in force, checked against the full cache's losses).
Family names become policies as streaming_4_{b-4} and h2o_4_{b//8}_{b}_{rule}.

Throughput: for each batch size, `h2o.eval.speed.measure_speed` on the full cache and each
family at `--throughput-budget`, interleaved. Before a batch size, on CPU, each policy's memory
is predicted from the previous batch size (its exact cache bytes plus the run's measured peak
growth, scaled by the batch ratio); the biggest policies that would not fit in `MEMORY_SHARE`
of the available memory stop there ("skipped: would exceed memory"); an out-of-memory error
stops the policy with the largest cache ("OOM") and the batch size is retried without it.
"""

from __future__ import annotations

import gc

import psutil
import torch

import h2o
from h2o.policies import resolve

from .. import data, report, retrieval, stats
from ..options import DEFAULT_CONTEXT, DEFAULT_NEW_TOKENS, MAX_BATCH
from ..session import load_text, unique_policies
from ..memory import MEMORY_SHARE, OK, OOM, SKIPPED, PeakMemory, is_oom
from ..ppl import check_eviction_in_force, text_losses
from ..runners import policy_name
from ..speed import measure_speed

NAME = "sweep"
HELP = "PPL vs cache budget per policy family, and decode throughput vs batch size until memory runs out"
PPL_COLUMNS = {"text": "Text", "genre": "Genre", "family": "Family", "budget": "Budget", "policy": "Policy", "ppl": "PPL",
               "ppl_after_eviction": "PPL after 1st eviction", "full_ppl_after_eviction": "Full, same tokens",
               "gap_closed": "Gap closed", "gap_interval": "[95%]", "kv_mib": "KV MiB", "passkey_kept": "Passkey kept"}
GENRE_COLUMNS = {"genre": "Genre", "budget": "Budget", "family": "Family", "texts": "Texts",
                 "mean_gap_closed": "Mean gap closed", "lowest_gap_closed": "Lowest", "below_streaming": "Below SLLM",
                 "surely_below": "Below (95%)"}
PAIRED_COLUMNS = {"budget": "Budget", "family_a": "A", "family_b": "B", "texts": "Texts", "a_lower": "A lower",
                  "b_lower": "B lower", "ties": "Ties", "p_value": "p (sign)", "verdict": "Verdict"}
SPEED_COLUMNS = {"batch": "Batch", "policy": "Policy", "status": "Status", "tpot_median_ms": "TPOT med (ms)",
                 "decode_tok_s": "Decode tok/s", "throughput_tok_s": "Gen tok/s (with prefill)",
                 "kv_mib": "KV MiB", "run_peak_growth_mib": "Run peak +MiB"}


def check(args) -> dict:
    """Resolve the device-dependent defaults and reject impossible requests before any loading."""
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    budgets = sorted(set(args.budgets))
    families = list(dict.fromkeys(args.rules))
    if "ppl" in args.parts:
        if args.ppl_chunk < 1:
            raise ValueError(f"--ppl-chunk must be >= 1, got {args.ppl_chunk}")
        if args.ppl_tokens <= budgets[-1] + args.buffer:
            raise ValueError(f"--ppl-tokens {args.ppl_tokens} never outgrows the largest budget + buffer "
                             f"({budgets[-1]} + {args.buffer}): no eviction would be measured")
    batches = args.batches or [1 << i for i in range(MAX_BATCH[kind].bit_length())]
    context = args.context or DEFAULT_CONTEXT[kind]
    new_tokens = args.new_tokens or DEFAULT_NEW_TOKENS[kind]
    if "throughput" in args.parts:
        if args.ray is not None:
            raise ValueError("--parts throughput measures speed and memory, which are never measured across workers "
                             "(they need every configuration interleaved in one process on one device): run it "
                             "without --ray, or --ray with --parts ppl")
        if min(batches) < 1 or batches != sorted(set(batches)):
            raise ValueError(f"--batches must be positive and strictly increasing, got {' '.join(map(str, batches))}")
        if args.repeats < 1 or new_tokens < 2:
            raise ValueError(f"--repeats must be >= 1 and --new-tokens >= 2 (got {args.repeats}, {new_tokens})")
        if context <= args.throughput_budget + args.buffer:
            raise ValueError(f"--context {context} does not outgrow --throughput-budget + --buffer "
                             f"({args.throughput_budget} + {args.buffer}): the compressed caches would not evict")
    if not 0 <= args.recent_share < 1:
        raise ValueError(f"--recent-share must lie in [0, 1), got {args.recent_share}")
    # families that give the same policy (h2o and h2o_mean, with the default rule) are merged, with a note
    at_first = [policy_name(f, budgets[0], args.score, args.recent_share) for f in families]
    families = [f for f, p in zip(families, at_first) if p in unique_policies(families, at_first)
                and at_first.index(p) == families.index(f)]
    ppl_policies = [policy_name(f, b, args.score, args.recent_share) for b in budgets for f in families]
    speed_policies = ["full"] + [policy_name(f, args.throughput_budget, args.score, args.recent_share) for f in families]
    resolve(ppl_policies + speed_policies)  # every name parses
    if args.cases < 0:
        raise ValueError(f"--cases must be >= 0, got {args.cases}")
    if min(args.lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {min(args.lengths)}")
    if args.cases and "ppl" in args.parts:
        from ..answers import check_passkey
        if args.model.startswith("random:"):
            raise ValueError("--cases (the passkey column) needs a pretrained model with a tokenizer")
        check_passkey(ppl_policies, args.lengths, args.buffer, args.model, args.positions)
    return {"budgets": budgets, "families": families, "batches": batches, "context": context,
            "new_tokens": new_tokens, "speed_policies": list(dict.fromkeys(speed_policies)),
            "text": load_text(args), "texts": load_texts(args.texts, args.data_dir) if args.texts else None}


def load_texts(specs: list[str], data_dir) -> dict[str, tuple[str, str]]:
    """{label: (text, source)} for each text spec (h2o.eval.data.load_spec: wikitext, pg19:<book id>,
    code:<stdlib module>, licence:python or a file path); a missing one is an error."""
    texts = {}
    for spec in dict.fromkeys(specs):
        label, text, source, _ = data.load_spec(spec, data_dir)
        texts[label] = (text, source)
    return texts


def genre(label: str) -> str:
    """The genre of a --texts label (h2o.eval.data.GENRES)."""
    kind = label.partition(":")[0] if ":" in label else label
    return data.GENRES.get(kind, data.GENRES["file"])


def run(session, plan) -> int:
    args = session.args
    model, tokenizer = session.load_model()
    info = session.info
    notes = [session.model_line]
    if tokenizer is None:
        notes.append(f"{info['name']} has random weights: PPL is meaningless (about the vocabulary size); "
                     "the PPL part only exercises the code path")
    results, tables = {}, []
    title = f"{info['name']} ({info['device']}, {info['dtype']}), positions {args.positions}"
    if "ppl" in args.parts:
        ppl_rows, what = ppl_part(session, plan, notes)
        notes.append(what)
        paired = compare_over_texts(ppl_rows)
        results["ppl_rows"], results["ppl_paired"] = ppl_rows, paired
        session.write_csv("sweep_ppl.csv", ppl_rows)
        session.plot("sweep_ppl.png", plot_ppl(ppl_rows, f"{title}\n{what}"))
        tables.append(report.format_table(ppl_rows, PPL_COLUMNS))
        by_genre = gap_by_genre(ppl_rows)
        if by_genre:
            results["ppl_by_genre"] = by_genre
            session.write_csv("sweep_ppl_genres.csv", by_genre)
            tables.append("gap closed by genre (mean and lowest over the genre's texts):\n"
                          + report.format_table(by_genre, GENRE_COLUMNS))
        if paired:
            session.write_csv("sweep_ppl_paired.csv", paired)
            tables.append("paired over texts (exact sign test on which PPL is lower, same budget):\n"
                          + report.format_table(paired, PAIRED_COLUMNS))
        notes.append(f"Gap closed [95%]: paired bootstrap over blocks of {stats.BLOCK} tokens ({stats.RESAMPLES} "
                     "resamples; the same blocks for the rule, StreamingLLM and the full cache)")
    if "throughput" in args.parts:
        speed_rows, what = throughput_part(session, plan, notes)
        notes.append(what)
        results["throughput_rows"] = speed_rows
        session.write_csv("sweep_throughput.csv", speed_rows)
        session.plot("sweep_throughput.png", plot_throughput(speed_rows, f"{title}\n{what.split(';')[0]}"))
        tables.append(report.format_table(speed_rows, SPEED_COLUMNS))
    session.write_json("sweep.json", plan={k: v for k, v in plan.items() if k not in ("text", "texts")}, **results, notes=notes)
    return session.finish(tables, notes)


# --- PPL vs budget -----------------------------------------------------------------------------

def ppl_part(session, plan, notes) -> tuple[list[dict], str]:
    """Every family at every budget on the same ids, the full cache first, each (policy, text) a unit of its own
    (batch 1: in this process or on Ray, resumable); with a streaming family, each rule's share of the
    StreamingLLM -> full gap closed at the same budget and text."""
    args = session.args
    if plan["texts"]:
        if session.tokenizer is None:
            raise ValueError("--texts needs a pretrained model with a tokenizer")
        ids = torch.cat([data.tokenize(session.tokenizer, text, args.ppl_tokens, args.bos)
                         for text, _ in plan["texts"].values()])
        labels, source = list(plan["texts"]), "; ".join(f"{k}={v[1]}" for k, v in plan["texts"].items())
    else:
        ids, source = session.token_ids(plan["text"], args.ppl_tokens)
        labels = ["text"]
    names = [(family, budget, policy_name(family, budget, args.score, args.recent_share))
             for budget in plan["budgets"] for family in plan["families"]]
    texts = {label: ids[i : i + 1] for i, label in enumerate(labels)}
    results = text_losses(session.run_units, texts, ["full"] + [name for _, _, name in names], desc="PPL",
                          chunk=args.ppl_chunk, prefill=args.ppl_chunk, positions=args.positions, buffer=args.buffer)
    rows = []
    for label in labels:
        full = results[label, "full"]
        rows.append({"text": label, "family": "full", "budget": None, "policy": "full", "ppl": full.ppl(),
                     "ppl_after_eviction": None, "full_ppl_after_eviction": None, "gap_closed": None,
                     "first_eviction": None, "max_kept": full.max_kept, "kv_mib": full.max_kv_bytes / report.MIB})
    for family, budget, name in names:
        for label in labels:
            result, full = results[label, name], results[label, "full"]
            check_eviction_in_force(full, result)
            same = None if result.first_eviction is None else \
                torch.exp(full.losses[0, result.first_eviction:].double().mean()).item()
            rows.append({"text": label, "family": family, "budget": budget, "policy": result.policy,
                         "ppl": result.ppl(), "ppl_after_eviction": result.ppl(after_eviction=True),
                         "full_ppl_after_eviction": same, "gap_closed": None,
                         "first_eviction": result.first_eviction, "max_kept": result.max_kept,
                         "kv_mib": result.max_kv_bytes / report.MIB})
            notes += [f"{result.policy} on {label}: {n}" for n in result.notes]
    losses = {(label, "full"): results[label, "full"].losses for label in labels}
    losses.update({(label, results[label, name].policy): results[label, name].losses
                   for _, _, name in names for label in labels})
    no_gap = {(r["text"], r["budget"]) for r in rows if r["family"] == "streaming"
              and not stats.gap_supported(losses[r["text"], r["policy"]], losses[r["text"], "full"])}
    notes += [f"{text} at budget {budget}: StreamingLLM's perplexity is not above the full cache's by more than the "
              "block bootstrap's noise, so there is no gap to close there: no gap closed" for text, budget in sorted(no_gap)]
    _gap_closed(rows, no_gap)
    _gap_intervals(rows, losses)
    mode = "token by token" if args.ppl_chunk == 1 else f"chunked, {args.ppl_chunk} tokens per forward"
    for r in rows:  # every row says how it was measured
        r.update(genre=genre(r["text"]) if plan["texts"] else None, ppl_mode=mode, ppl_tokens=args.ppl_tokens, positions=args.positions, buffer=args.buffer)
    if args.cases:
        from ..answers import kept_text, passkey_kept
        texts = plan["texts"] or {"text": plan["text"]}
        kept, note = passkey_kept(session, list(dict.fromkeys(r["policy"] for r in rows)),
                                  {k: v[0] for k, v in texts.items()}, args.cases, args.lengths,
                                  list(retrieval.PHRASINGS))
        for r in rows:
            k = kept[r["policy"]]
            r["passkey_kept"] = kept_text(k)
            r["passkey_kept_share"], r["passkey_kept_low"], r["passkey_kept_high"] = \
                k["kept_share"], k["kept_low"], k["kept_high"]
        notes.append(note)
    return rows, f"PPL on {source}, {mode}, BOS {'on' if args.bos else 'off'}"


def _gap_intervals(rows: list[dict], losses: dict) -> None:
    """Each gap closed's 95% interval: the paired block bootstrap of the rule's, StreamingLLM's and the full cache's
    token losses on that text (h2o.eval.stats.gap_closed_interval)."""
    streaming = {(r["text"], r["budget"]): r["policy"] for r in rows if r["family"] == "streaming"}
    for r in rows:
        r["gap_low"] = r["gap_high"] = None
        if r["gap_closed"] is None:
            r["gap_interval"] = "–"
            continue
        ci = stats.gap_closed_interval(losses[r["text"], r["policy"]], losses[r["text"], streaming[r["text"], r["budget"]]],
                                       losses[r["text"], "full"])
        r["gap_low"], r["gap_high"] = ci if ci else (None, None)
        r["gap_interval"] = stats.interval_text(ci)


def gap_by_genre(rows: list[dict]) -> list[dict]:
    """Per genre, budget and family: the mean and the lowest gap closed over the genre's texts, and on how many
    texts the family is below StreamingLLM (a gap closed < 0, its whole interval below 0)."""
    out = []
    scored = [r for r in rows if r["gap_closed"] is not None and r.get("genre")]
    for key in dict.fromkeys((r["genre"], r["budget"], r["family"]) for r in scored):
        group = [r for r in scored if (r["genre"], r["budget"], r["family"]) == key]
        gaps = [r["gap_closed"] for r in group]
        out.append({"genre": key[0], "budget": key[1], "family": key[2], "texts": len(group),
                    "mean_gap_closed": sum(gaps) / len(gaps), "lowest_gap_closed": min(gaps),
                    "below_streaming": sum(g < 0 for g in gaps),
                    "surely_below": sum(r["gap_high"] is not None and r["gap_high"] < 0 for r in group)})
    return out


def compare_over_texts(rows: list[dict]) -> list[dict]:
    """Every two families at the same budget over the texts they were both run on (two or more): the exact sign
    test on which has the lower PPL per text."""
    out = []
    ppl = {(r["text"], r["family"], r["budget"]): r["ppl"] for r in rows if r["family"] != "full"}
    for budget in dict.fromkeys(r["budget"] for r in rows if r["family"] != "full"):
        families = list(dict.fromkeys(r["family"] for r in rows if r["budget"] == budget))
        for i, a in enumerate(families):
            for b in families[i + 1:]:
                texts = [t for t in dict.fromkeys(r["text"] for r in rows)
                         if (t, a, budget) in ppl and (t, b, budget) in ppl]
                if len(texts) < 2:
                    continue
                test = stats.sign_test([ppl[t, a, budget] - ppl[t, b, budget] for t in texts])
                verdict = "not separated" if not test["supported"] else (
                    f"{a} better" if test["a_better"] > test["b_better"] else f"{b} better")
                out.append({"budget": budget, "family_a": a, "family_b": b, "texts": test["texts"],
                            "a_lower": test["a_better"], "b_lower": test["b_better"], "ties": test["ties"],
                            "p_value": test["p_value"], "verdict": verdict})
    return out


def _gap_closed(rows: list[dict], no_gap: set = frozenset()) -> None:
    """gap_closed = (PPL streaming - PPL rule) / (PPL streaming - PPL full), per text and budget: 1 is the full
    cache, 0 StreamingLLM, negative worse than StreamingLLM; none where (text, budget) is in `no_gap`."""
    full = {r["text"]: r["ppl"] for r in rows if r["family"] == "full"}
    streaming = {(r["text"], r["budget"]): r["ppl"] for r in rows if r["family"] == "streaming"}
    for r in rows:
        base = streaming.get((r["text"], r["budget"]))
        if base is not None and r["family"] not in ("full", "streaming") and base != full[r["text"]] \
                and (r["text"], r["budget"]) not in no_gap:
            r["gap_closed"] = stats.gap_closed(r["ppl"], base, full[r["text"]])


def plot_ppl(rows, title):
    """One panel per text: PPL against budget for every family, the full cache as a line."""
    plt = report.pyplot()
    texts = list(dict.fromkeys(r["text"] for r in rows))
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 4.5), layout="constrained", squeeze=False)
    for ax, text in zip(axes[0], texts):
        _ppl_panel(ax, [r for r in rows if r["text"] == text], text if len(texts) > 1 else "")
    fig.suptitle(f"PPL vs cache budget\n{title}", fontsize=8)
    return fig


def _ppl_panel(ax, rows, text):
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
    for i, family in enumerate(dict.fromkeys(r["family"] for r in rows if r["family"] != "full")):
        pts = [(r["budget"], r["ppl"]) for r in rows if r["family"] == family]
        example = next(r["policy"] for r in rows if r["family"] == family)
        ax.plot(*zip(*pts), "os^Dv<>p"[i % 8] + "-", color=f"C{i}", ms=7, label=f"{family} (e.g. {example})")
    full = next(r["ppl"] for r in rows if r["family"] == "full")
    ax.axhline(full, color="k", ls="--", lw=1, label=f"full cache ({full:.2f})")
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("cache budget (tokens kept per layer and head, log2 scale)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(text, fontsize=9)
    ax.legend(fontsize=7)


# --- throughput vs batch size --------------------------------------------------------------------

def predicted_growth(last: dict, batch: int, live: list[str]) -> float:
    """Memory a run at `batch` would add: the last run's non-cache growth and its live caches, scaled."""
    scale = batch / last["batch"]
    other = max(0, last["growth"] - sum(last["kv"].values()))
    return scale * (other + sum(last["kv"].get(p, 0) for p in live))


def throughput_part(session, plan, notes) -> tuple[list[dict], str]:
    args, model, tokenizer, device = session.args, session.model, session.tokenizer, session.device
    context, new_tokens = plan["context"], plan["new_tokens"]
    base, source = session.token_ids(plan["text"], context)
    live, rows, last = list(plan["speed_policies"]), [], None
    for batch in plan["batches"]:
        prompt = base.expand(batch, -1) if tokenizer is not None else \
            data.random_ids(model.config.vocab_size, context, batch)
        while live:
            if last is not None and device.type == "cpu":
                limit = MEMORY_SHARE * psutil.virtual_memory().available
                while live and predicted_growth(last, batch, live) > limit:
                    victim = _largest(live, last)
                    rows.append(_stop_row(batch, victim, SKIPPED, predicted_growth(last, batch, live)))
                    live.remove(victim)
                if not live:
                    break
            try:
                with PeakMemory(device) as peak:
                    speed = measure_speed(model, prompt, live, new_tokens=new_tokens, repeats=args.repeats,
                                          memory_steps=2, positions=args.positions, buffer=args.buffer,
                                          progress=not args.no_progress)
            except RuntimeError as err:
                if not is_oom(err):
                    raise
                speed = None
            finally:
                h2o.restore(model)
            if speed is None:  # out of memory: drop the biggest cache and retry this batch size
                victim = _largest(live, last)
                rows.append(_stop_row(batch, victim, OOM, None))
                live.remove(victim)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            for p in live:
                s = speed[p]
                rows.append({"batch": batch, "policy": s.policy, "status": OK, "tpot_median_ms": 1000 * s.tpot_median,
                             "tpot_min_ms": 1000 * s.tpot_min, "decode_tok_s": batch / s.tpot_median,
                             "throughput_tok_s": s.throughput, "ttft_s": s.ttft, "kv_bytes": s.kv_bytes,
                             "kv_mib": s.kv_bytes / report.MIB, "peak_mem_mib": s.peak_mem_bytes / report.MIB,
                             "run_peak_growth_mib": peak.growth / report.MIB, "predicted_growth_mib": None})
            last = {"batch": batch, "growth": peak.growth, "kv": {p: speed[p].kv_bytes for p in live}}
            break
        if not live:
            break
    for r in rows:
        if r["status"] != OK:
            notes.append(f"{r['policy']}: {r['status']} at batch {r['batch']}"
                         + (f" (predicted +{r['predicted_growth_mib']:.0f} MiB)" if r["predicted_growth_mib"] else ""))
    return rows, (f"throughput: prompt = {source} x batch, {new_tokens} new tokens, "
                 f"{args.repeats} interleaved repeat(s); Decode tok/s = batch / median TPOT; Gen tok/s includes "
                 "the prefill; Run peak +MiB = peak memory growth of the whole measurement (all policies; "
                 f"{'CUDA peak allocated' if device.type == 'cuda' else 'peak RSS'})")


def _largest(live: list[str], last: dict | None) -> str:
    """The live policy with the largest cache at the last batch size (the full cache if none was measured)."""
    if last is None:
        return "full" if "full" in live else live[0]
    return max(live, key=lambda p: last["kv"].get(p, 0))


def _stop_row(batch, policy, status, predicted) -> dict:
    return {"batch": batch, "policy": resolve([policy])[0], "status": status, "tpot_median_ms": None,
            "tpot_min_ms": None, "decode_tok_s": None, "throughput_tok_s": None, "ttft_s": None, "kv_bytes": None,
            "kv_mib": None, "peak_mem_mib": None, "run_peak_growth_mib": None,
            "predicted_growth_mib": None if predicted is None else predicted / report.MIB}


def plot_throughput(rows, title):
    plt = report.pyplot()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for i, p in enumerate(policies):
        ok = [r for r in rows if r["policy"] == p and r["status"] == OK]
        ax1.plot([r["batch"] for r in ok], [r["decode_tok_s"] for r in ok], "o-", color=f"C{i}", label=p)
        ax2.plot([r["batch"] for r in ok], [r["kv_mib"] for r in ok], "o-", color=f"C{i}", label=p)
        for r in rows:
            if r["policy"] == p and r["status"] != OK:
                for ax in (ax1, ax2):
                    ax.axvline(r["batch"], color=f"C{i}", ls=":", lw=1.2)
                    ax.text(r["batch"], 0.98, f" {p}: {r['status']}", color=f"C{i}", rotation=90, va="top",
                            ha="right", fontsize=7, transform=ax.get_xaxis_transform())
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_xlabel("batch size (rows, log2 scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if all(r["status"] == OK for r in rows):
        ax1.text(0.98, 0.02, f"no policy ran out of memory up to batch {batches[-1]}", transform=ax1.transAxes,
                 ha="right", va="bottom", fontsize=8, color="gray")
    ax1.set_ylabel("decode throughput (tokens/s, all rows)")
    ax1.set_ylim(bottom=0)
    ax1.set_title("Decode throughput = batch / median TPOT", fontsize=9)
    report.log_y(ax2, "KV cache at the end (MiB, log scale)")
    ax2.set_title("KV cache size (storages held)", fontsize=9)
    fig.suptitle(f"Throughput vs batch size: {title}", fontsize=9)
    return fig
