"""Fitting the surrogate of KVzip's scores (`h2o.score_surrogate`): KVzip runs on calibration windows, then every KV
head's predictors at once, the last window held out (`fit_surrogate`; the module docstring of `h2o.score_surrogate`
says what is fitted and how)."""

from __future__ import annotations

import time

import torch

from .head_probes import RECONSTRUCTION_SINKS as SINKS, reconstruction_windows, replayed_windows
from .models import compressed_layers, rotary_dims
from .score_surrogate import FLOOR, HIDDEN, KINDS, MLP_LR, MLP_STEPS, RIDGE, TOP_SHARE, Surrogate, _spearman, \
    features, fit_heads, top_overlap


def collect(model, tokenizer, windows, progress=None) -> list[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Per window, per compressed layer: (keys [H, n, D], values [H, n, Dv], KVzip scores [H, n]) of the window's keys
    after the sinks, from a KVzip cache that holds the window whole (`h2o.head_probes.replayed_windows`: no eviction,
    so the slots are in arrival order)."""
    return [[(layer.keys[0][:, SINKS:].float().cpu(), layer.values[0][:, SINKS:].float().cpu(),
              layer.state["score"][0][:, SINKS:].float().cpu()) for layer in layers]
            for layers in replayed_windows(model, tokenizer, windows, progress)]


def fit_surrogate(model, tokenizer, texts, tokens: int = 4096, seed: int = 0, progress=None,
                  text_names=None) -> Surrogate:
    """Fit the surrogate of `model` on about `tokens` tokens of the calibration `texts` (at least two equal windows of
    at most 1,024 tokens at seeded offsets; the last held out), see the module docstring.

    progress: an optional tqdm-like object, `.update(1)` after each window's KVzip run and after each layer's held-out
    check (every head is fitted at once, before them)."""
    if tokenizer is None or not texts:
        raise ValueError("the surrogate is fitted on KVzip scores of calibration text: pass the model's tokenizer and "
                         "calibration texts")
    if tokens < 64:
        raise ValueError(f"tokens={tokens}: the surrogate needs at least 64 calibration tokens (two windows, the last "
                         "held out)")
    windows = reconstruction_windows(tokenizer, list(texts), tokens, seed, min_windows=2)
    rotary = rotary_dims(model.config)
    started = time.perf_counter()
    data = collect(model, tokenizer, windows, progress)
    train, held = data[:-1], data[-1]
    layers, heads = len(data[0]), data[0][0][0].shape[0]
    head_dim = data[0][0][0].shape[-1]
    fit = {kind: {"spearman": [], "top_overlap": []} for kind in KINDS}
    baseline = {"spearman": [], "top_overlap": []}  # the key norm's ranking (KNorm): what reading keys alone gives
    # every (layer, KV head) fitted at once: equal windows give every head the same number of keys
    x = torch.stack([torch.cat([features(w[layer][0][h], w[layer][1][h], rotary) for w in train])
                     for layer in range(layers) for h in range(heads)])
    y = torch.stack([torch.cat([w[layer][2][h] for w in train]) for layer in range(layers) for h in range(heads)])
    fitted = fit_heads(x, y.clamp_min(FLOOR).log(), seed)
    tensors = {name: t.reshape(layers, heads, *t.shape[1:]) for name, t in fitted.items()}
    whole = Surrogate(rotary, head_dim, tensors)
    for layer in range(layers):
        keys, values, true = held[layer]
        truth = true.clamp_min(FLOOR).log()
        for kind in KINDS:
            pred = whole.predict(layer, tuple(range(heads)), keys.unsqueeze(0), values.unsqueeze(0), kind)[0]
            fit[kind]["spearman"].append([round(_spearman(pred[h], truth[h]), 4) for h in range(heads)])
            fit[kind]["top_overlap"].append([round(top_overlap(pred[h], truth[h]), 4) for h in range(heads)])
        norm = -keys.norm(dim=-1)
        baseline["spearman"].append([round(_spearman(norm[h], truth[h]), 4) for h in range(heads)])
        baseline["top_overlap"].append([round(top_overlap(norm[h], truth[h]), 4) for h in range(heads)])
        if progress is not None:
            progress.update(1)

    def mean(table):
        flat = [v for row in table for v in row]
        return round(sum(flat) / len(flat), 4)

    method = {
        "model": str(model.config.name_or_path), "layers": compressed_layers(model.config),
        "texts": list(text_names) if text_names is not None else None, "seed": seed,
        "windows": [len(w) for w in windows], "held_out_window": len(windows) - 1,
        "tokens_fitted": x.shape[1],  # keys per head fitted on (the held-out window's not among them)
        "target": f"log(max(KVzip score, {FLOOR}))", "features": "rotated key pairs' norms, unrotated key dims, value",
        "linear": f"ridge regression on standardised features, penalty {RIDGE}",
        "mlp": f"{HIDDEN} hidden units (GELU), Adam lr {MLP_LR}, {MLP_STEPS} full-batch steps",
        "held_out": {kind: {**fit[kind], "mean_spearman": mean(fit[kind]["spearman"]),
                            "mean_top_overlap": mean(fit[kind]["top_overlap"])} for kind in KINDS},
        "key_norm_baseline": {**baseline, "mean_spearman": mean(baseline["spearman"]),
                              "mean_top_overlap": mean(baseline["top_overlap"])},
        "top_share": TOP_SHARE, "seconds": round(time.perf_counter() - started, 1),
    }
    return Surrogate(rotary, head_dim, tensors, method)
