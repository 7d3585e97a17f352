"""The `h2o` command: bench (the results table), stress, sweep, heatmap."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from h2o.policies import parse, resolve

from . import data, models, report
from .ppl import ValidityError, check_eviction_in_force, token_losses
from .speed import measure_speed

DEFAULT_POLICIES = ["full", "streaming_4_252", "h2o_4_32_256", "streaming_4_508", "h2o_4_64_512"]
TABLE = {
    "configuration": "Configuration",
    "wikitext_ppl": "Wikitext PPL",
    "pg19_ppl": "PG-19 PPL",
    "text_ppl": "Text PPL",
    "total_time_s": "Total Time (s)",
    "avg_attn_ms": "Avg Attn (ms)",
    "ttft_s": "TTFT (s)",
    "tpot_ms": "TPOT (ms)",
    "throughput_tok_s": "Throughput (tok/s)",
    "peak_mem_mib": "Peak Mem (MiB)",
    "kv_mib": "KV MiB",
}


def common_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=models.EMBEDDED,
                   help=f"built-in name ({', '.join(models.list_models())}), hub id or local directory")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: fp32 on CPU, fp16 on CUDA)")
    g.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation")
    g.add_argument("--device-map", default=None, help='passed to accelerate, e.g. "auto" for multi-GPU models')
    g.add_argument("--data-dir", default=None, help="local corpora (default: $H2O_DATA_DIR, ../shared/data, else the hub)")
    g.add_argument("--bos", action="store_true", help="prepend the tokenizer's BOS token to every text")
    g = p.add_argument_group("cache")
    g.add_argument("--positions", default="original", choices=["original", "reindex"])
    g.add_argument("--buffer", type=int, default=64, help="lazy eviction slack (0 = evict every step)")
    g.add_argument("--score", default=None, choices=["mean", "sum"], help="H2O scoring rule for names without one")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="results", help="output directory (default: results/)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2o", description="KV-cache compression benchmarks (StreamingLLM, H2O)")
    sub = parser.add_subparsers(dest="command", required=True)
    parent = common_options()
    bench = sub.add_parser("bench", parents=[parent], help="the results table: PPL, speed and memory per policy",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--policies", nargs="+", default=DEFAULT_POLICIES,
                       help="policy names; 'full' (the baseline) is always run")
    bench.add_argument("--corpora", nargs="+", default=["wikitext", "pg19"], choices=list(data.CORPORA))
    bench.add_argument("--pg19-book", default=data.PG19_FIRST_BOOK)
    bench.add_argument("--text-file", default=None, help="also measure PPL on this text file")
    bench.add_argument("--ppl-tokens", type=int, default=2048, help="tokens scored per text")
    bench.add_argument("--no-ppl", action="store_true", help="speed and memory only")
    bench.add_argument("--ppl-mode", default="chunked", choices=["stream", "chunked"],
                       help="stream: token by token (StreamingLLM protocol); chunked: --chunk tokens per forward")
    bench.add_argument("--chunk", type=int, default=32)
    bench.add_argument("--context", type=int, default=2048, help="prompt tokens for the speed run")
    bench.add_argument("--new-tokens", type=int, default=64, help="tokens generated per speed run")
    bench.add_argument("--repeats", type=int, default=3)
    bench.add_argument("--batch", type=int, default=1, help="rows in the speed run")
    bench.set_defaults(run=run_bench)
    for name in ("stress", "sweep", "heatmap"):
        module = _optional_command(name)
        if module is not None:
            p = sub.add_parser(name, parents=[parent], help=module.HELP,
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
    return parser


def _optional_command(name):
    import importlib
    try:
        return importlib.import_module(f"h2o.eval.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"h2o.eval.{name}":
            raise
        return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            print(f"h2o {args.command}: error: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, ValidityError) as err:
        print(f"h2o {args.command}: error: {err}", file=sys.stderr)
        return 2


# --- bench ------------------------------------------------------------------------------------------

def load_texts(args) -> dict[str, tuple[str, str]]:
    """{column: (text, source)} for every corpus asked for; any missing one is an error, never replaced."""
    texts = {}
    for corpus in args.corpora:
        doc = args.pg19_book if corpus == "pg19" else None
        texts[corpus] = data.load_document(corpus, doc, args.data_dir)
    if args.text_file:
        texts["text"] = data.load_text_file(args.text_file)
    return texts


def run_bench(args) -> int:
    policies = resolve(["full"] + [p for p in args.policies if p != "full"], args.score)
    budgets = [parse(p).budget for p in policies if parse(p).budget is not None]
    if budgets and not args.no_ppl and args.ppl_tokens <= max(budgets) + args.buffer:
        raise ValueError(f"--ppl-tokens {args.ppl_tokens} never outgrows the largest budget + buffer "
                         f"({max(budgets)} + {args.buffer}): no eviction would be measured")
    if args.context < 1 or args.new_tokens < 2 or args.repeats < 1 or args.batch < 1 or args.chunk < 1:
        raise ValueError("--context, --repeats, --batch and --chunk must be >= 1 and --new-tokens >= 2")
    out = report.prepare_output_dir(args.out)
    texts = load_texts(args)
    started = time.time()
    model, tokenizer = models.load_model(args.model, args.device, args.dtype, args.attn, args.device_map)
    info = models.describe(model)
    progress = not args.no_progress

    ppl, ppl_sources = {}, {}
    if tokenizer is None:
        print(f"note: {args.model} has random weights: perplexity is not measured, only speed and memory")
    elif not args.no_ppl:
        rows = [data.tokenize(tokenizer, text, args.ppl_tokens, args.bos) for text, _ in texts.values()]
        ids = torch.cat(rows)
        chunk = 1 if args.ppl_mode == "stream" else args.chunk
        for policy in policies:
            ppl[policy] = token_losses(model, ids, policy, chunk=chunk, prefill=chunk, positions=args.positions,
                                       buffer=args.buffer, progress=progress, desc=f"PPL {policy}")
            if policy != "full":
                check_eviction_in_force(ppl["full"], ppl[policy])
        ppl_sources = {name: source for name, (_, source) in texts.items()}

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
        for name in texts if policy in ppl else ():
            i = list(texts).index(name)
            row[f"{name}_ppl"] = ppl[policy].ppl(i)
            row[f"{name}_ppl_after_eviction"] = ppl[policy].ppl(i, after_eviction=True)
        row.update({
            "total_time_s": s.total_s, "avg_attn_ms": s.attn_ms_per_step, "ttft_s": s.ttft,
            "tpot_ms": 1000 * s.tpot_median, "tpot_min_ms": 1000 * s.tpot_min,
            "throughput_tok_s": s.throughput, "peak_mem_mib": s.peak_mem_bytes / report.MIB,
            "peak_mem_kind": s.peak_mem_kind, "kv_mib": s.kv_bytes / report.MIB,
        })
        rows.append(row)

    columns = {k: v for k, v in TABLE.items() if k == "configuration" or any(k in r for r in rows)}
    table = report.format_table(rows, columns)
    mode = "token by token" if args.ppl_mode == "stream" else f"chunked, {args.chunk} tokens per forward"
    notes = [
        f"model {info['name']} ({info['family']}, {info['dtype']}, {info['device']}, attention {args.attn}); "
        f"positions {args.positions}, lazy buffer {args.buffer}",
        f"PPL: {args.ppl_tokens} tokens per text, {mode}, BOS {'on' if args.bos else 'off'}; texts: "
        + "; ".join(f"{k}={v}" for k, v in ppl_sources.items()) if ppl else "PPL: not measured",
        f"speed: prompt = {prompt_source} x batch {args.batch}; {args.new_tokens} new tokens, {args.repeats} "
        "interleaved repeats; TPOT median (min in CSV/JSON); Avg Attn = time in the attention modules per decode "
        f"step, all layers; Peak Mem = {rows[0]['peak_mem_kind']}; KV MiB = exact cache bytes at the end",
    ]
    for policy, result in ppl.items():
        notes += [f"{policy}: {note}" for note in result.notes]
    payload = {"command": "bench", "args": {k: v for k, v in vars(args).items() if k != "run"},
               "model": info, "environment": report.environment(), "ppl_mode": mode, "rows": rows,
               "notes": notes, "wall_time_s": time.time() - started}
    report.write_csv(out / "bench.csv", rows)
    report.write_json(out / "bench.json", payload)
    plot_bench(rows, texts if ppl else {}, out / "bench.png", info["name"], args.context)
    print(table)
    print("\n".join(f"- {n}" for n in notes))
    print(f"wrote {out / 'bench.csv'}, {out / 'bench.json'}, {out / 'bench.png'} ({time.time() - started:.0f} s)")
    return 0


def plot_bench(rows, texts, path, model_name, context) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["configuration"] for r in rows]
    panels = [(f"{t}_ppl", f"{t} PPL (lower is better)") for t in texts]
    panels += [("tpot_ms", f"TPOT after a {context}-token prompt, ms (median)"), ("kv_mib", "KV cache, MiB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        values = [r.get(key, float("nan")) for r in rows]
        bars = ax.bar(range(len(names)), values, color=["#555"] + ["#1f77b4"] * (len(names) - 1))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle(f"h2o bench: {model_name}")
    report.save_figure(fig, path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
