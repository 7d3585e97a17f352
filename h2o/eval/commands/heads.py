"""`h2o heads`: training-free scores of every KV head (`h2o.head_scores`), cached per model.

induction and echo (RazorAttention) come from the model alone, on repeated random tokens; retrieval (Retrieval
Head, Wu et al. 2024) from calibration needles in a PG-19 book that no evaluation of this project uses
(`CALIBRATION_BOOK`, 3129; the evaluations read 10146, 10321, 24553 and 2544), so that heads chosen by it are
not tuned on the texts they are then measured on. Random-weight models have no tokenizer: induction and echo
only. Prints the top heads per score, writes heads.csv (one row per layer x KV head), heads.json (the scores and
how they were made) and heads.png (a heatmap per score).

The scores are computed once per model and cached (`h2o.eval.head_score_cache`, which the head-wise allocations
also read); a cached file is reused only when its inputs equal this run's. --recompute forces it.
"""

from __future__ import annotations

from h2o.models import compressed_layers
from h2o.models import kv_heads as h2o_kv_heads

from .. import data, report
from ..head_score_cache import lookup

NAME = "heads"
HELP = "training-free KV-head scores: induction and echo on repeated random tokens, retrieval on calibration needles"
COLUMNS = {"rank": "Rank", "layer": "Layer", "kv_head": "KV head", "induction": "Induction", "echo": "Echo",
           "retrieval": "Retrieval", "ablation": "Ablation", "reconstruction": "Reconstruction"}


def check(args) -> dict:
    for name in ("random_tokens", "random_sequences", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.cases < 0:
        raise ValueError(f"--cases must be >= 0, got {args.cases}")
    if not 0 <= args.ablation_cases <= args.cases:
        raise ValueError(f"--ablation-cases must lie in [0, --cases = {args.cases}], got {args.ablation_cases}")
    if args.ablation_cases and args.model.startswith("random:"):
        raise ValueError("--ablation-cases needs needle cases in real text, which a random-weight model has no tokenizer "
                         "for: use --ablation-cases 0 with random: models")
    if args.reconstruction_tokens < 0:
        raise ValueError(f"--reconstruction-tokens must be >= 0, got {args.reconstruction_tokens}")
    if args.reconstruction_tokens and args.model.startswith("random:"):
        raise ValueError("--reconstruction-tokens replays real text with the model's tokenizer, which a random-weight "
                         "model has not: use --reconstruction-tokens 0 with random: models")
    if args.cases and args.context_tokens < 16:
        raise ValueError(f"--context-tokens must be >= 16, got {args.context_tokens}")
    calibrated = (args.cases > 0 or args.reconstruction_tokens > 0) and not args.model.startswith("random:")
    text = data.load_document("pg19", args.calibration_book, args.data_dir) if calibrated else None
    return {"text": text}


# --- the command -----------------------------------------------------------------------------------

def run(session, plan) -> int:
    args = session.args
    model, tokenizer = session.load_model(attn="sdpa")  # the scores run the probe's own attention, whatever this
    info = session.info
    options = {"seed": args.seed, "random_tokens": args.random_tokens, "repeats": args.random_sequences,
               "cases": args.cases, "context_tokens": args.context_tokens, "ablation_cases": args.ablation_cases,
               "reconstruction_tokens": args.reconstruction_tokens}
    retrieval = tokenizer is not None and args.cases > 0
    layers_heads = len(compressed_layers(model.config)) * h2o_kv_heads(model.config)
    ablated = args.ablation_cases * layers_heads if retrieval else 0
    windows = -(-args.reconstruction_tokens // 1024) if tokenizer is not None else 0
    bar = session.progress(total=args.random_sequences + (args.cases if retrieval else 0) + ablated + windows,
                           desc="head scores")
    try:
        scores, path, reused = lookup(model, tokenizer, args.model, args.data_dir, bar, book=args.calibration_book,
                                      text=plan["text"], recompute=args.recompute, **options)
    finally:
        bar.close()
    method = scores.method
    names = list(scores.scores)
    layers, heads = scores.shape
    model_layer = method.get("layers") or list(range(layers))  # a hybrid model's tables: its compressed layers
    ranks = {name: {(l, h): i + 1 for i, (l, h, _) in enumerate(scores.ranked(name))} for name in names}
    rows = [{"layer": model_layer[l], "kv_head": h, **{name: float(scores[name][l, h]) for name in names},
             **{f"{name}_rank": ranks[name][l, h] for name in names}} for l in range(layers) for h in range(heads)]
    by_head = {(l, h): rows[l * heads + h] for l in range(layers) for h in range(heads)}
    tables, top = [], {}
    for name in names:
        best = [{"rank": i + 1, **by_head[l, h]} for i, (l, h) in enumerate(scores.top(name, args.top))]
        top[name] = [[r["layer"], r["kv_head"], r[name]] for r in best]
        tables.append(f"top {len(best)} of {layers * heads} KV heads by {name}:\n" + report.format_table(best, COLUMNS))

    group = method.get("query_heads_per_kv_head")
    notes = [f"model {info['name']} ({info['family']}, {info['dtype']}, {info['device']}), {layers} layers x "
             f"{heads} KV heads ({group} query heads each; a KV head's score is the max over them)"
             + (f"; only its full-attention layers {model_layer} are scored (its sliding-window layers are never "
                "compressed)" if len(model_layer) < info["layers"] else ""),
             (f"cached scores reused from {path} (same inputs; --recompute to redo)" if reused else
              f"computed in {method.get('seconds', float('nan')):.0f} s and cached at {path}"),
             f"induction / echo: the attention of the second copy's queries on the token after / at their token's "
             f"previous occurrence, {args.random_sequences} x {args.random_tokens} random tokens fed twice (seed {args.seed})"]
    if "retrieval" in names:
        counts = method.get("token_counts", {})
        source = (method.get("calibration_text") or {}).get("source", "")
        notes.append(f"retrieval: {args.cases} needle cases in PG-19 book {args.calibration_book} ({source}), "
                     f"{args.context_tokens} haystack tokens each, depths 0.1-0.9; hits = attention argmax on the "
                     f"needle token being copied, over {counts.get('copied_tokens')} copied answer tokens (the model "
                     f"predicts {counts.get('teacher_forced_correct')} of them itself, teacher-forced)")
    elif tokenizer is None:
        notes.append(f"{info['name']} has random weights and no tokenizer: no retrieval score (it needs calibration "
                     "text); induction and echo only, and on random weights they are not expected to single out heads")
    else:
        notes.append("no retrieval score: --cases 0")
    if "ablation" in names:
        notes.append(f"ablation: {args.ablation_cases} of the needle cases, each KV head in turn keeping only its first "
                     "4 and last 32 keys; the answer's mean log-probability drop, over the largest drop "
                     f"(the largest: {max(map(max, method['ablation_drops'])):.3f} nats)")
    if "reconstruction" in names:
        notes.append(f"reconstruction: {method['reconstruction']}")
    session.write_csv("heads.csv", rows)
    session.write_json("heads.json", head_scores=scores.to_json(), top=top,
                       cache={"path": str(path), "reused": reused}, notes=notes)
    session.plot("heads.png", plot(scores, info["name"]))
    return session.finish(tables, notes)


def plot(scores, model_name: str):
    """One heatmap per score: layer on y, KV head on x, each cell annotated with its value."""
    plt = report.pyplot()
    names = list(scores.scores)
    layers, heads = scores.shape
    width = max(2.2, 0.55 * heads + 1.2)
    fig, axes = plt.subplots(1, len(names), figsize=(width * len(names), max(4.0, 0.28 * layers + 1.5)),
                             layout="constrained", squeeze=False)
    annotate = layers * heads <= 2048
    for ax, name in zip(axes[0], names):
        table = scores[name].numpy()
        image = ax.imshow(table, vmin=0, vmax=1, cmap="viridis", aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("KV head")
        ax.set_ylabel("layer")
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers), [str(i) for i in scores.method.get("layers") or range(layers)])
        ax.tick_params(labelsize=7)
        if annotate:
            for l in range(layers):
                for h in range(heads):
                    v = float(table[l, h])
                    ax.text(h, l, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if v > 0.6 else "white")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.6, label="score (max over the KV head's query heads)")
    fig.suptitle(f"Head scores of {model_name}", fontsize=11)
    return fig
