"""`h2o bench`: the results table. PPL, speed and memory per policy, on the same texts and prompt."""

from __future__ import annotations

import torch

from h2o.policies import parse, resolve

from . import data, models, report, retrieval, tasks
from .ppl import check_eviction_in_force, token_losses
from .speed import measure_speed

NAME = "bench"
HELP = "the results table: PPL, speed and memory per policy"
DEFAULT_POLICIES = ["full", "streaming_4_252", "h2o_4_32_256", "streaming_4_508", "h2o_4_64_512"]
TABLE = {
    "configuration": "Configuration",
    "wikitext_ppl": "Wikitext PPL",
    "pg19_ppl": "PG-19 PPL",
    "text_ppl": "Text PPL",
    "passkey_kept": "Passkey kept",
    "total_time_s": "Total Time (s)",
    "avg_attn_ms": "Avg Attn (ms)",
    "ttft_s": "TTFT (s)",
    "tpot_median_ms": "TPOT med (ms)",
    "throughput_tok_s": "Throughput (tok/s)",
    "peak_mem_mib": "Peak Mem (MiB)",
    "kv_mib": "KV MiB",
}


def add_arguments(p) -> None:
    p.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                   help="policy names; 'full' (the baseline) is always run")
    p.add_argument("--corpora", nargs="+", default=["wikitext", "pg19"], choices=list(data.CORPORA))
    p.add_argument("--pg19-book", default=data.PG19_FIRST_BOOK)
    p.add_argument("--text-file", default=None, help="also measure PPL on this text file")
    p.add_argument("--ppl-tokens", type=int, default=2048, help="tokens scored per text")
    p.add_argument("--no-ppl", action="store_true", help="speed and memory only")
    p.add_argument("--ppl-mode", default="chunked", choices=["stream", "chunked"],
                   help="stream: token by token (StreamingLLM protocol); chunked: --chunk tokens per forward")
    p.add_argument("--chunk", type=int, default=32)
    p.add_argument("--context", type=int, default=2048, help="prompt tokens for the speed run")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speed run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="rows in the speed run")
    p.add_argument("--passkey-cases", type=int, default=10,
                   help="passkey cases (depths spread over 0.1-0.9) for the retrieval column; 0 = none")
    p.add_argument("--passkey-length", type=int, default=1280, help="passkey prompt tokens")


def check(args) -> dict:
    policies = resolve(["full"] + [p for p in args.policies if p != "full"], args.score)
    budgets = [parse(p).budget for p in policies if parse(p).budget is not None]
    if budgets and not args.no_ppl and args.ppl_tokens <= max(budgets) + args.buffer:
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} never outgrows the largest budget + buffer "
                         f"({max(budgets)} + {args.buffer}): no eviction would be measured")
    if args.context < 1 or args.new_tokens < 2 or args.repeats < 1 or args.batch < 1 or args.chunk < 1:
        raise ValueError("--context, --repeats, --batch and --chunk must be >= 1 and --new-tokens >= 2")
    texts = {}  # {column: (text, source)}; any missing one is an error, never replaced
    for corpus in args.corpora:
        texts[corpus] = data.load_document(corpus, args.pg19_book if corpus == "pg19" else None, args.data_dir)
    if args.text_file:
        texts["text"] = data.load_text_file(args.text_file)
    if args.passkey_cases < 0:
        raise ValueError(f"--passkey-cases must be >= 0, got {args.passkey_cases}")
    if args.passkey_cases and not args.model.startswith("random:"):
        n = args.passkey_length
        for p in policies:
            if parse(p).evicts and parse(p).budget + args.buffer >= 0.95 * n - 1:
                raise ValueError(f"{p}: budget + buffer ({parse(p).budget} + {args.buffer}) holds the whole "
                                 f"{n}-token passkey prompt, so nothing would be compressed; raise --passkey-length")
        trained = getattr(models.load_config(args.model), "max_position_embeddings", None)
        if args.positions == "original" and trained and n + retrieval.MAX_NEW_TOKENS["passkey"] > trained:
            raise ValueError(f"--passkey-length {n} passes the model's trained context of {trained} with positions "
                             "'original'")
    return {"policies": policies, "texts": texts}


def passkey_column(session, policies, texts) -> tuple[dict, str]:
    """{policy: (solved by it among the full cache's solved, the full cache's solved, cases)} and a note."""
    args = session.args
    n = args.passkey_cases
    depths = [0.5] if n == 1 else [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]
    haystacks = {name: text for name, (text, _) in texts.items()}
    cases = retrieval.generate_cases("passkey", session.tokenizer, haystacks, [args.passkey_length], depths, 1, 0)
    variant_list = [tasks.Variant(p, str(parse(p).budget), name=p) for p in policies if p != "full"]
    bar = session.progress(total=len(cases) * len(policies), desc="passkey", unit="run")
    rows = tasks.run_cases(session.model, session.tokenizer, cases, variant_list, "question-aware", chunk=args.chunk,
                           positions=args.positions, buffer=args.buffer, bar=bar)
    bar.close()
    summary, notes = tasks.summarize(rows, min_solved=1)
    out = {}
    for r in summary:
        policy = "full" if r["policy"] == "full" else r["policy"]
        out[policy] = r
    note = (f"Passkey kept: {len(cases)} passkey cases of {args.passkey_length} tokens (depths 0.1-0.9, haystacks "
            f"{', '.join(haystacks)}), question-aware protocol; full: cases it solved; policies: solved among the "
            "full cache's solved cases (the full-cache control; `h2o tasks` has the other tasks)")
    return out, "; ".join([note, *notes])


def run(session, plan) -> int:
    args, policies, texts = session.args, plan["policies"], plan["texts"]
    model, tokenizer = session.load_model()
    progress = not args.no_progress

    ppl, ppl_sources = {}, {}
    notes = [session.model_line]
    if tokenizer is None:
        print(f"note: {args.model} has random weights: perplexity is not measured, only speed and memory")
    elif not args.no_ppl:
        ids = torch.cat([data.tokenize(tokenizer, text, args.ppl_tokens, args.bos) for text, _ in texts.values()])
        chunk = 1 if args.ppl_mode == "stream" else args.chunk
        for policy in policies:
            ppl[policy] = token_losses(model, ids, policy, chunk=chunk, prefill=chunk, positions=args.positions,
                                       buffer=args.buffer, progress=progress, desc=f"PPL {policy}")
            if policy != "full":
                check_eviction_in_force(ppl["full"], ppl[policy])
        ppl_sources = {name: source for name, (_, source) in texts.items()}

    passkey, passkey_note = {}, None
    if tokenizer is not None and args.passkey_cases:
        passkey, passkey_note = passkey_column(session, policies, texts)

    if tokenizer is None or "wikitext" not in texts:
        prompt = data.random_ids(model.config.vocab_size, args.context, args.batch)
        prompt_source = "random ids"
    else:
        prompt = data.tokenize(tokenizer, texts["wikitext"][0], args.context, args.bos).expand(args.batch, -1)
        prompt_source = f"first {args.context} tokens of {texts['wikitext'][1]}"
    speed = measure_speed(model, prompt, policies, new_tokens=args.new_tokens, repeats=args.repeats,
                          positions=args.positions, buffer=args.buffer, progress=progress)

    rows = []
    for policy in policies:
        s = speed[policy]
        row = {"configuration": policy}
        for i, name in enumerate(texts if policy in ppl else ()):
            row[f"{name}_ppl"] = ppl[policy].ppl(i)
            row[f"{name}_ppl_after_eviction"] = ppl[policy].ppl(i, after_eviction=True)
        if policy in passkey:
            k = passkey[policy]
            row["passkey_kept"] = (f"{k['full_solved']}/{k['cases']}" if policy == "full"
                                   else f"{k['policy_solved']}/{k['full_solved']}")
            row["passkey_kept_share"] = k["kept_share"]
        row.update({
            "total_time_s": s.total_s, "avg_attn_ms": s.attn_ms_per_step, "ttft_s": s.ttft,
            "tpot_median_ms": 1000 * s.tpot_median, "tpot_min_ms": 1000 * s.tpot_min,
            "throughput_tok_s": s.throughput, "peak_mem_mib": s.peak_mem_bytes / report.MIB,
            "peak_mem_kind": s.peak_mem_kind, "kv_mib": s.kv_bytes / report.MIB,
        })
        rows.append(row)

    columns = {k: v for k, v in TABLE.items() if k == "configuration" or any(k in r for r in rows)}
    mode = "token by token" if args.ppl_mode == "stream" else f"chunked, {args.chunk} tokens per forward"
    notes += [
        f"PPL: {args.ppl_tokens} tokens per text, {mode}, BOS {'on' if args.bos else 'off'}; texts: "
        + "; ".join(f"{k}={v}" for k, v in ppl_sources.items()) if ppl else "PPL: not measured",
        f"speed: prompt = {prompt_source} x batch {args.batch}; {args.new_tokens} new tokens, {args.repeats} "
        "interleaved repeats; TPOT median (min in CSV/JSON); Avg Attn = time in the attention modules per decode "
        f"step, all layers; Peak Mem = {rows[0]['peak_mem_kind']}; KV MiB = exact cache bytes at the end",
    ]
    notes += [passkey_note] if passkey_note else []
    for policy, result in ppl.items():
        notes += [f"{policy}: {note}" for note in result.notes]
    session.write_csv("bench.csv", rows)
    session.write_json("bench.json", ppl_mode=mode, rows=rows, notes=notes)
    session.plot("bench.png", plot(rows, texts if ppl else {}, session.info["name"], args.context))
    return session.finish([report.format_table(rows, columns)], notes)


def plot(rows, texts, model_name, context):
    plt = report.pyplot()
    names = [r["configuration"] for r in rows]
    panels = [(f"{t}_ppl", f"{t} PPL (lower is better)") for t in texts]
    panels += [("tpot_median_ms", f"TPOT after a {context}-token prompt, ms (median)"), ("kv_mib", "KV cache, MiB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key, float("nan")) for r in rows]
        bars = ax.bar(range(len(names)), values, color=["#555"] + ["#1f77b4"] * (len(names) - 1))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"h2o bench: {model_name}")
    return fig
