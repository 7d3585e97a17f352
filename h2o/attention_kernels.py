"""The attention math that the eager attention function (`h2o.attention`) and the static layout (`h2o.static`) share:
one new query's attention with the scores a rule observes, and h2o-vlen's per-query shares. Only torch: below both.
"""

from __future__ import annotations

import torch


def vlen_share(probs, norms, query_valid, start, stop):
    """probs [B, Hkv, G, n, V], norms [B, Hkv, V] -> [B, Hkv, V]: h2o-vlen's per-query shares, summed."""
    weighted = probs.mean(dim=2) * norms.unsqueeze(2)  # [B, Hkv, n, V]
    weighted = weighted / weighted.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    if query_valid is not None:
        weighted = weighted * query_valid[:, None, start:stop, None]
    return weighted.sum(dim=2)


def decode_step(query, key, value, mask, scaling, wants, query_valid, query_weights, half):
    """fused_attention for one new query, as few kernels as it takes: (B x Hkv) batched matmuls over the
    group's query heads, no block loop, no layout copy of the output. Returns (output [B, 1, Hq, Dv], mass,
    last, probabilities [B, Hkv, G, L])."""
    b, hq, _, d = query.shape
    hkv, length, dv = key.shape[1], key.shape[2], value.shape[-1]
    groups = hq // hkv
    grouped = query.reshape(b * hkv, groups, d)
    keys = key.reshape(b * hkv, length, d)  # a view: the slot-slice of the layer's buffer merges B and H
    if half:
        grouped, keys = grouped.to(torch.float32), keys.to(torch.float32)
    grouped = grouped * scaling
    logits = torch.bmm(grouped, keys.transpose(1, 2))  # [B*Hkv, G, L]
    if mask is not None:  # [B, 1, 1, L] (one mask for the row) or [B, Hkv, L] (one per KV head: h2o.static)
        logits.view(b, hkv, groups, length).masked_fill_(~mask.view(b, -1, 1, length), -torch.inf)
    probs = logits.softmax(dim=-1)
    out = torch.bmm(probs.to(value.dtype), value.reshape(b * hkv, length, dv))  # [B*Hkv, G, Dv] = [B, 1, Hq, Dv]
    probs = probs.view(b, hkv, groups, length)
    mass = last = None
    if "mass" in wants:
        mass = probs.sum(dim=2)
        if query_valid is not None:  # a padding token's query adds nothing
            mass *= query_valid.view(b, 1, 1)
        if query_weights is not None:
            mass *= query_weights[-1].to(torch.float32)
    if "last" in wants:
        last = probs.mean(dim=2)
    return out.view(b, 1, hq, dv), mass, last, probs
