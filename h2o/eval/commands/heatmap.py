"""`h2o heatmap`: attention maps of chosen layers over a short text, showing sinks and heavy hitters.

One forward with eager attention (`output_attentions` needs it) over the first `--tokens` tokens.
For each chosen layer: the head-averaged attention matrix (query rows x key columns, log colour
scale), and the attention each key received, summed over the queries (head-averaged: H2O's
"sum" score, which H2O itself keeps per head). Marked and measured: the share of all attention
mass that lands on the first `--sinks` tokens and on the `--top-k` heavy hitters among the
rest, next to what uniform causal attention would give.
"""

from __future__ import annotations

import psutil
import torch

from .. import report
from ..session import load_text
from ..memory import MEMORY_SHARE

NAME = "heatmap"
HELP = "attention heatmaps (log scale) of chosen layers over a short text: sinks and heavy hitters"
COLUMNS = {"layer": "Layer", "kind": "Kind", "sink_share": "Sink share", "uniform_sink_share": "Uniform sink share",
           "heavy_share": "Heavy-hitter share", "uniform_heavy_share": "Uniform HH share",
           "heavy_hitters": "Heavy hitters"}


def check_layers(requested: list[int] | None, n: int) -> list[int]:
    if requested is None:
        return sorted({0, n // 2, n - 1})
    bad = [i for i in requested if not -n <= i < n]
    if bad:
        raise ValueError(f"unknown layer index {bad[0]}: the model has {n} layers (0..{n - 1}, or -{n}..-1)")
    return list(dict.fromkeys(i % n for i in requested))


def token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id]) if tokenizer is not None else f"#{token_id}"
    return text.replace("\n", "⏎").replace("\r", "").replace("$", r"\$") or "∅"


def check(args) -> dict:
    if args.tokens < args.sinks + args.top_k + 1 or args.sinks < 0 or args.top_k < 1:
        raise ValueError(f"--tokens ({args.tokens}) must exceed --sinks ({args.sinks}) + --top-k ({args.top_k}), "
                         "with --sinks >= 0 and --top-k >= 1")
    return {"text": load_text(args)}


def run(session, plan) -> int:
    args = session.args
    model, tokenizer = session.load_model(attn="eager")
    info = session.info
    layers = check_layers(args.layers, info["layers"])
    t = args.tokens
    need = info["layers"] * info["q_heads"] * t * t * torch.finfo(model.dtype).bits // 8
    available = psutil.virtual_memory().available if model.device.type == "cpu" else torch.cuda.mem_get_info()[0]
    if need > MEMORY_SHARE * available:
        raise ValueError(f"--tokens {t}: the attention maps of all {info['layers']} layers need "
                         f"{need / report.MIB:.0f} MiB, more than {MEMORY_SHARE:.0%} of the memory available; "
                         "use fewer tokens")
    ids, source = session.token_ids(plan["text"], t)
    with torch.no_grad():
        attentions = model(ids.to(model.device), output_attentions=True).attentions
    labels = [token_label(tokenizer, i) for i in ids[0].tolist()]

    # uniform causal attention: query q gives 1/(q+1) to each of keys 0..q
    uniform = (torch.ones(t, t).tril() / torch.arange(1, t + 1).unsqueeze(1)).sum(0)
    from h2o.models import layer_windows

    windows = layer_windows(model.config)
    rows, per_layer = [], {}
    for layer in layers:
        probs = attentions[layer][0].float().cpu()  # [heads, q, k]
        mean = probs.mean(0)
        received = mean.sum(0)  # [k]: attention each key received, all queries, head-averaged
        rest = received.clone()
        rest[: args.sinks] = -torch.inf
        heavy = rest.topk(args.top_k).indices.sort().values
        row = {"layer": layer,
               # a sliding-window layer the model bounds itself (never compressed), or a full-attention one
               "kind": f"sliding {windows[layer]}" if windows[layer] else "full",
               "sink_share": (received[: args.sinks].sum() / t).item(),
               "uniform_sink_share": (uniform[: args.sinks].sum() / t).item(),
               "heavy_share": (received[heavy].sum() / t).item(),
               "uniform_heavy_share": (uniform[heavy].sum() / t).item(),
               "heavy_hitters": " ".join(f"{i}:{labels[i]!r}" for i in heavy.tolist()),
               "sink_share_per_head": [round(v, 4) for v in (probs.sum(1)[:, : args.sinks].sum(-1) / t).tolist()]}
        rows.append(row)
        per_layer[layer] = {"received": received.tolist(), "heavy_hitters": heavy.tolist()}
        session.plot(f"heatmap_layer{layer}.png",
                     plot_layer(mean, received, heavy, labels, args.sinks, layer, info, source, row))

    notes = [f"model {info['name']} ({info['family']}, {info['dtype']}, {info['device']}), eager attention "
             "(output_attentions needs it)",
             f"text: {source}, BOS {'on' if args.bos else 'off'}",
             f"share = attention mass on those keys / all mass ({t} query rows, each summing to 1), head-averaged; "
             f"heavy hitters = top {args.top_k} keys by attention received, outside the first {args.sinks}; "
             "uniform = the same keys under uniform causal attention"]
    if tokenizer is None:
        notes.append(f"{info['name']} has random weights: no sinks or heavy hitters are expected")
    session.write_csv("heatmap.csv", [{k: v for k, v in r.items() if k != "sink_share_per_head"} for r in rows])
    session.write_json("heatmap.json", layers=layers, text=source, tokens=labels, token_ids=ids[0].tolist(),
                       rows=rows, received=per_layer, notes=notes)
    return session.finish([report.format_table(rows, COLUMNS)], notes)


def plot_layer(mean, received, heavy, labels, sinks, layer, info, source, row):
    plt = report.pyplot()
    from matplotlib.colors import LogNorm

    t = mean.shape[0]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 10.5), height_ratios=[3, 1.3], layout="constrained")
    shown = mean.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("nan")).numpy()
    positive = mean[mean > 0]
    floor = max(positive.min().item(), 1e-5) if positive.numel() else 1e-5
    image = ax1.imshow(shown, norm=LogNorm(vmin=floor, vmax=1.0), cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax1, label="attention weight (head-averaged, log scale)", shrink=0.8)
    ax1.set_xlabel("key position (token index)")
    ax1.set_ylabel("query position (token index)")
    ax1.set_title(f"Layer {layer}: attention, query rows x key columns (upper triangle: future, masked)\n"
                  f"{info['name']}, {source}", fontsize=9)

    colors = ["#bbbbbb"] * t
    for i in range(min(sinks, t)):
        colors[i] = "#d62728"
    for i in heavy.tolist():
        colors[i] = "#ff7f0e"
    ax2.bar(range(t), received.numpy(), color=colors, width=1.0)
    ax2.set_xlim(-0.5, t - 0.5)
    report.log_y(ax2, "attention received\n(sum over queries, log)")
    for i in heavy.tolist():  # name each heavy hitter above its bar
        ax2.annotate(labels[i], (i, received[i].item()), xytext=(0, 3), textcoords="offset points", rotation=90,
                     ha="center", va="bottom", fontsize=7, color="#b35900")
    ax2.set_ylim(top=ax2.get_ylim()[1] * 30)  # room for the labels and the legend
    ax2.set_xlabel("key position (token index)")
    sink_words = " ".join(repr(w) for w in labels[:sinks])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in ("#d62728", "#ff7f0e", "#bbbbbb")]
    ax2.legend(handles, [f"first {sinks} tokens ({sink_words}): {row['sink_share']:.1%} of all attention "
                         f"(uniform: {row['uniform_sink_share']:.1%})",
                         f"top {len(heavy)} heavy hitters: {row['heavy_share']:.1%} (uniform: "
                         f"{row['uniform_heavy_share']:.1%})", "other tokens"], fontsize=7, loc="upper right")
    ax2.set_title("Attention each key received = H2O's 'sum' score (head-averaged)", fontsize=9)
    return fig
