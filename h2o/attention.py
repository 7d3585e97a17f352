"""The attention function that feeds a compressed cache: registered by name, with its mask builder.

transformers looks attention functions up by `config._attn_implementation`. We register
``h2o_sdpa`` and ``h2o_eager``, each wrapping the stock implementation, together with the stock
mask builder under the same name (without it transformers builds no causal mask at all). When
the layer that just ran `update` is one of ours, the wrapper

1. records which new tokens are padding (from the stock mask's diagonal),
2. in reindex mode moves the new keys and the queries to their slot positions,
3. runs the stock attention with a mask over the kept slots (exact, not approximated),
4. adds the attention mass each kept key received to its scores (H2O only), in float32,
   query-chunked so a long prefill never materialises the whole [heads, q, k] matrix,
5. lets the layer evict.

Any other call (no compressed layer, e.g. a `full` cache) passes straight through.
"""

from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .cache import take_pending

# Attention-probability block materialised while scoring (float32 elements: 4 MiB). Measured here
# (2 CPU cores, 9 query heads): fastest of 2^18..2^22 at 1k-4k prompts; cache-sized blocks win.
SCORE_BLOCK_ELEMENTS = 1 << 20
NAMES = {"sdpa": "h2o_sdpa", "eager": "h2o_eager"}


def attention_mass(query, key, mask, scaling, query_valid=None, block_elements=SCORE_BLOCK_ELEMENTS):
    """Attention each key received, summed over queries and over the query heads of its KV head.

    query [B, Hq, q, D], key [B, Hkv, L, D] (the last q keys belong to the queries),
    mask bool [B, 1, q, L] or None (plain causal), query_valid bool [B, q] or None.
    Returns float32 [B, Hkv, L]. Queries are taken in blocks of about `block_elements`
    probabilities, and each block only reads the keys its queries can see.
    """
    b, hq, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    grouped = query.view(b, hkv, groups, q, d)
    keys_t = key.to(torch.float32).transpose(-1, -2)  # [B, Hkv, D, L]
    mass = torch.zeros(b, hkv, length, dtype=torch.float32, device=key.device)
    step = max(1, block_elements // max(1, b * hq * length))
    for start in range(0, q, step):
        stop = min(q, start + step)
        visible = length - q + stop  # later keys are in every query's future
        block = grouped[:, :, :, start:stop].reshape(b, hkv, groups * (stop - start), d).to(torch.float32)
        logits = torch.matmul(block, keys_t[..., :visible]).view(b, hkv, groups, stop - start, visible)
        logits *= scaling
        if mask is not None:
            logits.masked_fill_(~mask[:, :, start:stop, :visible].unsqueeze(2), -torch.inf)
        elif stop - start > 1:
            rows = torch.arange(start, stop, device=key.device).unsqueeze(-1) + (length - q)
            logits.masked_fill_(torch.arange(visible, device=key.device) > rows, -torch.inf)
        probs = logits.softmax(dim=-1)
        if query_valid is not None:
            probs *= query_valid[:, None, None, start:stop, None]
        mass[..., :visible] += probs.sum(dim=(2, 3))
    return mass


def _new_token_validity(attention_mask: torch.Tensor | None, q: int) -> torch.Tensor | None:
    """Which of the q new tokens are real, read off the stock mask's last (always real) query row."""
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, -q:]
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _eager_inner(module, query, key, value, mask, **kwargs):
    eager = sys.modules[type(module).__module__].eager_attention_forward
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
            ~mask, torch.finfo(query.dtype).min
        )
    return eager(module, query, key, value, mask, **kwargs)


def _compressed_attention(inner, module, query, key, value, attention_mask, scaling=None, **kwargs):
    layer = take_pending(key)
    if layer is None:
        return inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    q = query.shape[-2]
    new_valid = _new_token_validity(attention_mask, q)
    if new_valid is not None:
        layer.mark_padding(new_valid)
    if layer.reindex:
        query = layer.reposition(query, kwargs.get("position_ids"))
    mask = layer.attention_mask(q, causal_by_default=inner is sdpa_attention_forward)
    out = inner(module, query, key, value, mask, scaling=scaling, **kwargs)
    if layer.scores is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        layer.add_scores(attention_mass(query, key, mask, scale, new_valid))
    layer.evict_if_needed()
    return out


def h2o_sdpa(module, query, key, value, attention_mask, **kwargs):
    return _compressed_attention(sdpa_attention_forward, module, query, key, value, attention_mask, **kwargs)


def h2o_eager(module, query, key, value, attention_mask, **kwargs):
    return _compressed_attention(_eager_inner, module, query, key, value, attention_mask, **kwargs)


def register() -> None:
    """Register both functions and their mask builders with transformers (idempotent)."""
    AttentionInterface.register(NAMES["sdpa"], h2o_sdpa)
    AttentionMaskInterface.register(NAMES["sdpa"], sdpa_mask)
    AttentionInterface.register(NAMES["eager"], h2o_eager)
    AttentionMaskInterface.register(NAMES["eager"], eager_mask)
