"""`h2o surrogate`: fit the surrogate of KVzip's scores (`h2o.fit_surrogate`) that every kvzap rule ranks by, cache it
beside the model, and report how well it predicts the scores on a held-out window.

It is fitted on KVzip scores of the calibration book no evaluation uses (PG-19 3129): windows of up to 1,024 tokens,
each fed once into a KVzip cache holding it whole (this library's own replay), the last window held out. The table:
per compressed layer, the held-out Spearman correlation of the predicted and the true scores, and the share of the
true top 20% that the predicted top 20% finds, for the ridge regression (kvzap_...), the MLP (kvzap_..._mlp) and the
key norm alone (KNorm's ranking: what reading the key without a fit gives). Writes surrogate.csv, surrogate.json and
surrogate.png. The other commands fit (or reuse) the same cached file when a kvzap rule first needs it.
"""

from __future__ import annotations

from .. import data, report
from ..surrogate_cache import lookup

NAME = "surrogate"
HELP = "fit the surrogate of KVzip's scores that kvzap rules rank by, and report its held-out fit"
COLUMNS = {"layer": "Layer", "linear_spearman": "Linear ρ", "linear_top": "Linear top 20%",
           "mlp_spearman": "MLP ρ", "mlp_top": "MLP top 20%", "key_norm_spearman": "Key norm ρ",
           "key_norm_top": "Key norm top 20%"}


def check(args) -> dict:
    if args.calibration_tokens < 64:
        raise ValueError(f"--calibration-tokens must be >= 64 (two windows, the last held out), got {args.calibration_tokens}")
    if args.model.startswith("random:"):
        raise ValueError("the surrogate is fitted on KVzip scores of real text, which needs the model's tokenizer; a "
                         "random-weight model has none: use a real model (e.g. --model smollm2-135m)")
    data.load_document("pg19", args.calibration_book, args.data_dir)  # the book exists: refused before the model loads
    return {}


def run(session, plan) -> int:
    args = session.args
    model, tokenizer = session.load_model(attn="sdpa")
    from h2o.models import compressed_layers

    layers = len(compressed_layers(model.config))
    windows = max(2, -(-args.calibration_tokens // 1024))
    bar = session.progress(total=windows + layers, desc="surrogate (KVzip runs, then fits per layer)")
    try:
        surrogate, path, reused = lookup(model, tokenizer, args.model, args.data_dir, bar, book=args.calibration_book,
                                         tokens=args.calibration_tokens, seed=args.seed, recompute=args.recompute)
    finally:
        bar.close()
    m = surrogate.method
    held, base = m["held_out"], m["key_norm_baseline"]

    def mean(row):
        return sum(row) / len(row)

    rows = [{"layer": model_layer,
             "linear_spearman": mean(held["linear"]["spearman"][i]), "linear_top": mean(held["linear"]["top_overlap"][i]),
             "mlp_spearman": mean(held["mlp"]["spearman"][i]), "mlp_top": mean(held["mlp"]["top_overlap"][i]),
             "key_norm_spearman": mean(base["spearman"][i]), "key_norm_top": mean(base["top_overlap"][i])}
            for i, model_layer in enumerate(m["layers"])]
    total = {"layer": "all", "linear_spearman": held["linear"]["mean_spearman"],
             "linear_top": held["linear"]["mean_top_overlap"], "mlp_spearman": held["mlp"]["mean_spearman"],
             "mlp_top": held["mlp"]["mean_top_overlap"], "key_norm_spearman": base["mean_spearman"],
             "key_norm_top": base["mean_top_overlap"]}
    table = report.format_table([*rows, total], COLUMNS)
    info = session.info
    notes = [f"model {info['name']} ({info['family']}, {info['dtype']}, {info['device']}): {surrogate.shape[0]} compressed "
             f"layers x {surrogate.shape[1]} KV heads, {surrogate.width} features per key ({m['features']}); its tensors "
             f"hold {surrogate.nbytes() / 2**20:.2f} MiB, the model's (shared by every cache, as its weights are; not in "
             "a cache's KV MiB)",
             (f"cached surrogate reused from {path} (same inputs; --recompute to refit)" if reused else
              f"fitted in {m['seconds']:.0f} s and cached at {path}"),
             f"fitted on {m['tokens_fitted']} keys of {len(m['windows']) - 1} window(s) of {m['texts']}, held out: window "
             f"{m['held_out_window'] + 1} ({m['windows'][-1]} tokens); target {m['target']}",
             "ρ: Spearman's rank correlation of predicted and true KVzip scores per KV head, averaged; top 20%: the share "
             "of the true top 20% of keys that the predicted top 20% holds (chance: 0.20); key norm: the negated key "
             "norm's ranking (KNorm), no fit",
             f"linear: {m['linear']}; MLP: {m['mlp']}"]
    session.write_csv("surrogate.csv", [*rows, total])
    session.write_json("surrogate.json", method=m, path=str(path), reused=reused, notes=notes)
    session.plot("surrogate.png", plot(rows, info["name"]))
    return session.finish([f"held-out fit of the surrogate of KVzip's scores, per layer:\n{table}"], notes)


def plot(rows, model_name: str):
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    x = [r["layer"] for r in rows]
    for ax, what, title in ((axes[0], "spearman", "Spearman ρ (held out)"), (axes[1], "top", "top-20% overlap (held out)")):
        for kind, label in (("linear", "linear (kvzap)"), ("mlp", "MLP (kvzap_mlp)"), ("key_norm", "key norm (no fit)")):
            ax.plot(x, [r[f"{kind}_{what}"] for r in rows], marker="o", markersize=3, label=label)
        ax.set_xlabel("layer")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.2, color="grey", linestyle=":", label="chance")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Surrogate of KVzip's scores, {model_name}", fontsize=11)
    return fig
