"""The attention function that feeds a compressed cache: registered by name, with its mask builder.

transformers looks attention functions up by `config._attn_implementation`. We register
``h2o_sdpa`` and ``h2o_eager``, each wrapping the stock implementation, together with the stock
mask builder under the same name (without it transformers builds no causal mask at all). When
the layer that just ran `update` is one of ours, the wrapper (the contract is written in
`h2o.policies.base`)

1. lets the layer prepare: padding of the new tokens, reindex rotation, the mask over kept slots;
2. computes the attention output and only what the layer's policy observes (summed mass, the newest
   query's row, query counts), the probabilities in float32:
   - under sdpa, for a rule that observes attention, in one pass (`fused_attention`): per block of
     queries, the logits, the probabilities, the output and the mass each key received, so QK^T is
     computed once (query-blocked, so a long prefill never materialises the whole [heads, q, k]
     matrix; each block reads only the keys its queries can see);
   - otherwise (eager, a rule that observes no attention, or an attention call with options the
     one-pass path does not reproduce: dropout, softcapping, position bias), the stock attention
     with the exact mask, then the observations in a second, equally blocked pass;
3. hands the observation to the layer, which updates the policy's state and evicts.

The layer says how its heads or rows map onto such runs: the wrapper calls its `attend` with the call
(`h2o.handover.AttentionCall`), and imports no layer class.

Any other call (no compressed layer, e.g. a `full` cache) passes straight through.
"""

from __future__ import annotations

import os
import sys

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from .attention_kernels import decode_step, vlen_share
from .handover import take_pending
from .policies import Observation

# Attention-probability block materialised per step of a long forward's blocked attention (float32
# elements), per device type. CPU: 4 MiB, the fastest of 2^18..2^30 on 2 cores (`benchmarks/test_score_blocks.py`
# --device cpu, one layer's 2048-token prefill, 9 query heads: 77, 58, 64, 107, 170, 167, 180 ms for 2^18, 2^20,
# ..., 2^30); cache-sized blocks win. CUDA: 1 GiB, so that a 32k-token prompt with 32 heads still takes 256 queries per
# block (at 4 MiB it would take one: tens of thousands of kernel launches per layer). H2O_SCORE_BLOCK_ELEMENTS
# overrides both.
SCORE_BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 28}
NAMES = {"sdpa": "h2o_sdpa", "eager": "h2o_eager"}


def score_block_elements(device: torch.device | str) -> int:
    """The blocked attention's probability-block size on `device` (see SCORE_BLOCK_ELEMENTS)."""
    override = os.environ.get("H2O_SCORE_BLOCK_ELEMENTS")
    if override:
        return int(override)
    return SCORE_BLOCK_ELEMENTS.get(torch.device(device).type, SCORE_BLOCK_ELEMENTS["cpu"])


def _capped(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """The model's soft-capped logits (Gemma 2: softcap * tanh(logits / softcap)), in place; as they are without."""
    if softcap:
        logits.div_(softcap).tanh_().mul_(softcap)
    return logits


def _probability_blocks(query, key, mask, scaling, block_elements=None, softcap=None):
    """The float32 attention probabilities of the queries, block by block: (start, stop, visible, probs
    [B, Hkv, G, stop - start, visible]). Blocks hold about `block_elements` probabilities, and each reads only
    the keys its queries can see (the last q keys belong to the queries)."""
    b, hq, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    grouped = query.view(b, hkv, groups, q, d)
    keys_t = key.to(torch.float32).transpose(-1, -2)  # [B, Hkv, D, L]
    step = max(1, (block_elements or score_block_elements(key.device)) // max(1, b * hq * length))
    for start in range(0, q, step):
        stop = min(q, start + step)
        visible = length - q + stop  # later keys are in every query's future
        block = grouped[:, :, :, start:stop].reshape(b, hkv, groups * (stop - start), d).to(torch.float32)
        logits = torch.matmul(block, keys_t[..., :visible]).view(b, hkv, groups, stop - start, visible)
        logits *= scaling
        _capped(logits, softcap)
        if mask is not None:
            logits.masked_fill_(~mask[:, :, start:stop, :visible].unsqueeze(2), -torch.inf)
        elif stop - start > 1:
            rows = torch.arange(start, stop, device=key.device).unsqueeze(-1) + (length - q)
            logits.masked_fill_(torch.arange(visible, device=key.device) > rows, -torch.inf)
        yield start, stop, visible, logits.softmax(dim=-1)


def attention_mass(query, key, mask, scaling, query_valid=None, block_elements=None, query_weights=None,
                   softcap=None):
    """Attention each key received, summed over queries and over the query heads of its KV head.

    query [B, Hq, q, D], key [B, Hkv, L, D] (the last q keys belong to the queries),
    mask bool [B, 1, q, L] or None (plain causal), query_valid bool [B, q] or None,
    query_weights float [q] or None (each query's weight in the sum).
    Returns float32 [B, Hkv, L], computed block by block (`_probability_blocks`).
    """
    mass = torch.zeros(key.shape[0], key.shape[1], key.shape[2], dtype=torch.float32, device=key.device)
    for start, stop, visible, probs in _probability_blocks(query, key, mask, scaling, block_elements, softcap):
        if query_valid is not None:
            probs *= query_valid[:, None, None, start:stop, None]
        if query_weights is not None:
            probs *= query_weights[start:stop].to(probs.device, torch.float32).view(1, 1, 1, -1, 1)
        mass[..., :visible] += probs.sum(dim=(2, 3))
    return mass


def last_query_row(query, key, mask, scaling, softcap=None):
    """The newest query's attention over the kept keys, averaged over the query heads of each KV head:
    float32 [B, Hkv, L] (the newest query is always real and sees every kept key but padding)."""
    b, hq, _, d = query.shape
    hkv = key.shape[1]
    last = query[:, :, -1:].reshape(b, hkv, hq // hkv, d).to(torch.float32)
    logits = _capped(torch.matmul(last, key.to(torch.float32).transpose(-1, -2)) * scaling, softcap)  # [B, Hkv, G, L]
    if mask is not None:
        logits.masked_fill_(~mask[:, :, -1:, :], -torch.inf)
    return logits.softmax(dim=-1).mean(dim=2)


def value_weighted_mass(query, key, value, mask, scaling, query_valid=None, block_elements=None, softcap=None):
    """Each key's share of each query's value-weighted attention, summed over the real queries (keys_values'
    h2o-vlen): per query, the group-averaged attention row times ||v||_2, renormalised to sum to one.
    float32 [B, Hkv, L], computed block by block (`_probability_blocks`)."""
    norms = value.to(torch.float32).norm(dim=-1)  # [B, Hkv, L]
    out = torch.zeros_like(norms)
    for start, stop, visible, probs in _probability_blocks(query, key, mask, scaling, block_elements, softcap):
        out[..., :visible] += vlen_share(probs, norms[..., :visible], query_valid, start, stop)
    return out


def replay_attention(query, key, chosen, scaling, block_elements=None, softcap=None):
    """KVzip's score of one replay forward: per key, the largest attention probability any replay query of its KV
    head's group gives it, the softmax taken over the `chosen` keys only [B, Hkv, L] (the sinks, the chunk being
    reconstructed, the replay's own keys: the last q, causal). float32 [B, Hkv, L], 0 where not chosen; computed
    block by block of queries (about `block_elements` probabilities a block).

    Only the columns some row and head chose enter the product: a key no softmax takes over adds nothing to it, so
    a replay chunk's scores cost its queries x (sinks + chunk + its own keys), not x the whole context."""
    b, hq, q, d = query.shape
    hkv, length = key.shape[1], key.shape[2]
    groups = hq // hkv
    context = length - q
    columns = chosen[..., :context].any(dim=1).any(dim=0).nonzero().squeeze(-1)  # older keys some softmax takes
    m = columns.numel()
    keys_t = torch.cat([key[:, :, columns], key[:, :, context:]], dim=2).to(torch.float32).transpose(-1, -2)
    picked = torch.cat([chosen[..., columns], chosen[..., context:]], dim=-1)  # [B, Hkv, m + q]
    grouped = query.view(b, hkv, groups, q, d)
    scores = torch.zeros(b, hkv, m + q, dtype=torch.float32, device=key.device)
    step = max(1, (block_elements or score_block_elements(key.device)) // max(1, b * hq * (m + q)))
    for start in range(0, q, step):
        stop = min(q, start + step)
        n, visible = stop - start, m + stop
        block = grouped[:, :, :, start:stop].reshape(b, hkv, groups * n, d).to(torch.float32) * scaling
        logits = _capped(torch.matmul(block, keys_t[..., :visible]).view(b, hkv, groups, n, visible), softcap)
        logits.masked_fill_(~picked[:, :, None, None, :visible], -torch.inf)
        if n > 1:  # the block's own later keys are in its queries' future
            logits[..., visible - n:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=key.device).triu_(1),
                                                   -torch.inf)
        best = logits.softmax(dim=-1).amax(dim=(2, 3))
        torch.maximum(scores[..., :visible], best, out=scores[..., :visible])
    out = torch.zeros(b, hkv, length, dtype=torch.float32, device=key.device)
    out[..., columns] = scores[..., :m]
    out[..., context:] = scores[..., m:]
    return out


def query_counts(key, mask, q, query_valid):
    """How many of the q new real queries saw each kept key: float32 [B, 1, L]."""
    b, length = key.shape[0], key.shape[2]
    if mask is None:  # causal over fresh keys, every older key seen by all q
        seen_by = torch.clamp(length - torch.arange(length, device=key.device), max=q).to(torch.float32)
        return seen_by.expand(b, 1, length).clone()
    m = mask[:, 0]
    if query_valid is not None:
        m = m & query_valid[:, :, None]
    return m.sum(dim=1, dtype=torch.float32).unsqueeze(1)


def fused_attention(query, key, value, mask, scaling, query_valid=None, wants=frozenset(), query_weights=None,
                    block_elements=None, with_vmass=False):
    """Attention output and observations in one pass over the keys: (output [B, q, Hq, Dv] laid out as
    sdpa_attention_forward returns it, mass or None, last or None).

    Per block of queries: logits = q k^T (float32), probabilities = softmax (float32), output =
    probabilities @ v (in the model dtype, as eager attention), and, from the same probabilities, the mass
    each key received (`attention_mass`'s definition) and the newest query's row (`last_query_row`'s).
    Equal to SDPA within floating-point tolerance; no second QK^T. With `with_vmass`, a fourth result: the
    h2o-vlen observation (`value_weighted_mass`'s definition) if "vmass" is wanted, else None.
    """
    b, hq, q, d = query.shape
    hkv, length, dv = key.shape[1], key.shape[2], value.shape[-1]
    groups = hq // hkv
    half = key.dtype != torch.float32
    vnorms = value.to(torch.float32).norm(dim=-1) if "vmass" in wants else None
    if q == 1:
        out, mass, last, probs = decode_step(query, key, value, mask, scaling, wants, query_valid, query_weights, half)
        vmass = vlen_share(probs.unsqueeze(3), vnorms, query_valid, 0, 1) if vnorms is not None else None
        return (out, mass, last, vmass) if with_vmass else (out, mass, last)
    vmass = torch.zeros_like(vnorms) if vnorms is not None else None
    grouped = query.view(b, hkv, groups, q, d)
    keys_t = (key.to(torch.float32) if half else key).transpose(-1, -2)  # [B, Hkv, D, L]
    mass = torch.zeros(b, hkv, length, dtype=torch.float32, device=key.device) if "mass" in wants else None
    last = None
    out = query.new_empty(b, hkv, groups, q, dv)
    step = max(1, (block_elements or score_block_elements(key.device)) // max(1, b * hq * length))
    future = {}  # block size -> its [n, n] upper triangle: the block's own later keys
    for start in range(0, q, step):
        stop = min(q, start + step)
        n, visible = stop - start, length - q + stop  # later keys are in every query's future
        block = grouped[:, :, :, start:stop].reshape(b, hkv, groups * n, d)
        block = (block.to(torch.float32) if half else block) * scaling  # the queries scaled: n x d, not n x L
        logits = torch.matmul(block, keys_t[..., :visible])
        logits = logits.view(b, hkv, groups, n, visible)
        if mask is not None:
            logits.masked_fill_(~mask[:, :, start:stop, :visible].unsqueeze(2), -torch.inf)
        elif n > 1:  # plain causal: only the block's own keys hold a future
            if n not in future:
                future[n] = torch.ones(n, n, dtype=torch.bool, device=key.device).triu_(1)
            logits[..., visible - n:].masked_fill_(future[n], -torch.inf)
        probs = logits.softmax(dim=-1)
        block_out = torch.matmul(probs.view(b, hkv, groups * n, visible).to(value.dtype), value[:, :, :visible])
        out[:, :, :, start:stop] = block_out.view(b, hkv, groups, n, dv)
        if "last" in wants and stop == q:  # the newest query sees every kept key (visible == length)
            last = probs[:, :, :, -1].mean(dim=2)
        if vmass is not None:
            vmass[..., :visible] += vlen_share(probs, vnorms[..., :visible], query_valid, start, stop)
        if mass is not None:
            if query_valid is not None:
                probs = probs * query_valid[:, None, None, start:stop, None]
            if query_weights is not None:
                probs = probs * query_weights[start:stop].to(probs.device, torch.float32).view(1, 1, 1, -1, 1)
            mass[..., :visible] += probs.sum(dim=(2, 3))
    out = out.reshape(b, hq, q, dv).transpose(1, 2).contiguous()
    return (out, mass, last, vmass) if with_vmass else (out, mass, last)


def plain_softmax(module, kwargs) -> bool:
    """Whether this call's attention is plain softmax attention: no dropout, softcapping, position bias or
    attention sinks (what h2o's own attention computes, in the one-pass path and in the static layout)."""
    return (not (module.training and kwargs.get("dropout")) and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and not {"s_aux", "sinks"} & kwargs.keys())


def fusable(inner, module, kwargs) -> bool:
    """Whether the one-pass path computes what the stock attention would for this call: sdpa, plain softmax
    attention, and no cache or weights asked of it."""
    return (inner is sdpa_attention_forward and plain_softmax(module, kwargs)
            and kwargs.get("cache") is None and not kwargs.get("output_attentions"))


def observe(policy, query, key, value, mask, scaling, query_valid, softcap=None) -> Observation:
    """Exactly the observations `policy.observes` asks for (nothing else is computed), from the model's own
    probabilities (its logits soft-capped where the model caps them)."""
    wants = policy.observes
    q = query.shape[-2]
    if not wants:
        return Observation(queries=q)
    return Observation(
        queries=q,
        mass=attention_mass(query, key, mask, scaling, query_valid, query_weights=policy.query_weights(q, key.device),
                            softcap=softcap) if "mass" in wants else None,
        last=last_query_row(query, key, mask, scaling, softcap) if "last" in wants else None,
        count=query_counts(key, mask, q, query_valid) if "count" in wants else None,
        vmass=value_weighted_mass(query, key, value, mask, scaling, query_valid, softcap=softcap)
        if "vmass" in wants else None,
    )


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
    call = _Call(inner, module, scaling, kwargs)
    out = layer.attend(call, query, attention_mask)
    return out, (call.weights if call.runs == 1 else None)


class _Call:
    """One call of the attention function (`h2o.handover.AttentionCall`): the stock attention `inner`, its module,
    scaling and options, handed to the layer's `attend`."""

    def __init__(self, inner, module, scaling, kwargs):
        self.inner, self.module, self.scaling, self.kwargs = inner, module, scaling, kwargs
        self.runs, self.weights = 0, None  # compressed runs made; the stock attention's weights of the last one

    def compressed(self, layer, query, attention_mask):
        out, self.weights = _attend(self.inner, self.module, layer, query, layer.keys, layer.values, attention_mask,
                                    self.scaling, self.kwargs)
        self.runs += 1
        return out

    def row(self, b, rows, query, attention_mask):
        def pick(t):
            return t[b:b + 1] if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == rows > 1 else t
        kwargs = {k: pick(v) if k == "position_ids" else v for k, v in self.kwargs.items()}
        return _Call(self.inner, self.module, self.scaling, kwargs), pick(query), pick(attention_mask)

    def plain_softmax(self):
        return plain_softmax(self.module, self.kwargs)

    def scale(self, query):
        return self.scaling if self.scaling is not None else query.shape[-1] ** -0.5


def _attend(inner, module, layer, query, key, value, attention_mask, scaling, kwargs):
    """One compressed layer's attention: prepare, attention with what the policy observes, observe (and evict).
    Returns (output, the stock attention's weights or None)."""
    query, mask, new_valid = layer.prepare(query, attention_mask, kwargs.get("position_ids"),
                                           causal_by_default=inner is sdpa_attention_forward)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    policy = layer.policy
    wants = policy.observes
    if layer.replay is not None:  # a replay forward (KVzip): the model's own attention, and the replay's scores
        out, weights = inner(module, query, key, value, mask, scaling=scaling, **kwargs)
        layer.observe(Observation(queries=query.shape[-2], replay=replay_attention(
            query, key, layer.replay_keys(), scale, softcap=kwargs.get("softcap"))))
        return out, weights
    if wants & {"mass", "last", "vmass"} and fusable(inner, module, kwargs):
        q = query.shape[-2]
        out, mass, last, vmass = fused_attention(query, key, value, mask, scale, new_valid, wants,
                                                 policy.query_weights(q, key.device) if "mass" in wants else None,
                                                 with_vmass=True)
        count = query_counts(key, mask, q, new_valid) if "count" in wants else None
        layer.observe(Observation(queries=q, mass=mass, last=last, count=count, vmass=vmass))
        return out, None
    out, weights = inner(module, query, key, value, mask, scaling=scaling, **kwargs)
    layer.observe(observe(policy, query, key, value, mask, scale, new_valid, kwargs.get("softcap")))
    return out, weights


# `dropout` may come positionally (kvpress's attention patch wraps every registered function that way).

def h2o_sdpa(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    return _compressed_attention(sdpa_attention_forward, module, query, key, value, attention_mask, dropout=dropout,
                                 **kwargs)


def h2o_eager(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
    return _compressed_attention(_eager_inner, module, query, key, value, attention_mask, dropout=dropout, **kwargs)


def register() -> None:
    """Register both functions and their mask builders with transformers (idempotent)."""
    AttentionInterface.register(NAMES["sdpa"], h2o_sdpa)
    AttentionMaskInterface.register(NAMES["sdpa"], sdpa_mask)
    AttentionInterface.register(NAMES["eager"], h2o_eager)
    AttentionMaskInterface.register(NAMES["eager"], eager_mask)
