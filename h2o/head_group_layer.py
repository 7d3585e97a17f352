"""`HeadGroupLayer`: one model layer whose KV heads hold different numbers of tokens (the layer kind of head and layer
budgets), and `split_evict`, the joint (Ada-KV) eviction of a set of heads that a layer, or a budget shared across
layers (`h2o.shared_budget`), runs."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from .compressed_layer import CompressedLayer
from .handover import leave_pending
from .policies import Policy
from .policies.allocation import LayerPlan, split_budget


def _first_group(name: str) -> property:
    """A head-group layer's `keys` or `values`: its first group's, read live. The base classes set them to None (at
    construction, on reset); any other value is refused."""

    def read(self):
        subs = self.sublayers if self.is_initialized else []
        return getattr(subs[0], name) if subs else None

    def write(self, value) -> None:
        if value is not None:
            raise AttributeError(f"a head-group layer's {name} are its head groups' (read-only)")

    return property(read, write)


class HeadGroupLayer(DynamicLayer):
    """One model layer whose KV heads hold different numbers of tokens: each group of heads is a `CompressedLayer`
    of its own over those heads (its own preallocated buffers, sized by its own budget), so a head holds, and
    `kv_bytes` counts, only its own tokens; nothing is masked. h2o's attention function runs once per group on the
    group's keys and its query heads, and writes the outputs back in head order.

    A joint layer (Ada-KV) has one group per head; after attention, once its heads hold more than
    heads x (budget + buffer) tokens together, it ranks all their slots together (`split_budget`), reads the
    per-head counts back to the host (one read per eviction: the new lengths are data-dependent shapes) and
    cuts each head to its count with the usual one gather per head."""

    is_croppable = False

    def __init__(self, plan: LayerPlan, rule: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        super().__init__()
        self.plan = plan
        self.heads = sum(len(heads) for heads, _ in plan.groups)
        self.sublayers = [CompressedLayer(rule.with_budget(budget).for_heads(heads), buffer, reindex, rope,
                                          joint=plan.joint, rule_budget=rule.budget)
                          for heads, budget in plan.groups]
        self.whole = plan.groups[0][0] == tuple(range(self.heads))  # one group of every head, in order
        self.buffer, self.is_initialized = buffer, False
        self._index: dict = {}  # (device, query groups) -> per group (KV head index, query head index)

    def index(self, device, groups: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group, its KV heads and its query heads (GQA: KV head h serves query heads h*groups .. + groups-1)."""
        key = (device, groups)
        if key not in self._index:
            self._index[key] = [(torch.tensor(heads, device=device),
                                 torch.tensor([h * groups + g for h in heads for g in range(groups)], device=device))
                                for heads, _ in self.plan.groups]
        return self._index[key]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.whole:  # one group of every head in order (a layer budget): no heads to pick
            self.sublayers[0].update(key_states, value_states)
        for (kv, _), sub in zip(self.index(key_states.device), [] if self.whole else self.sublayers):
            sub.update(key_states.index_select(1, kv), value_states.index_select(1, kv))
        self.is_initialized = True
        leave_pending(self)
        return self.keys, self.values

    # The first head group's kept keys and values: what the attention function finds the layer by (and what a view
    # of them keeps alive). Read live, never kept: a copy taken before an eviction would keep the evicted buffers
    # alive. The kept tokens of each head are `head_lengths()`.
    keys = _first_group("keys")
    values = _first_group("values")

    def attend(self, call, query, attention_mask, split: bool = True):
        """One compressed run per head group on its keys and its query heads, written back in head order; then (with
        `split`) the layer's joint split, if any (a `RowsLayer` splits its rows itself)."""
        if self.whole:  # one group of every head in order (a layer budget): no heads to pick
            out = call.compressed(self.sublayers[0], query, attention_mask)
            if split:
                self.observed()
            return out
        out = None
        for (_, heads), sub in zip(self.index(query.device, query.shape[1] // self.heads), self.sublayers):
            part = call.compressed(sub, query.index_select(1, heads), attention_mask)  # [B, q, group's heads, Dv]
            if out is None:
                out = part.new_empty(*part.shape[:2], query.shape[1], part.shape[-1])
            out.index_copy_(2, heads, part)
        if split:
            self.observed()
        return out

    def observed(self) -> bool:
        """After every group's attention: a joint layer over its total budget + buffers splits and evicts."""
        return self.plan.joint and split_evict(self.sublayers, self.plan.total, self.plan.floor, self.buffer)

    @property
    def length(self) -> int:
        """The longest head's kept tokens."""
        return max(sub.length for sub in self.sublayers)

    @property
    def seen(self) -> int:
        return self.sublayers[0].seen

    def head_lengths(self) -> list[int]:
        """Kept tokens per KV head, in head order."""
        return self._per_head(lambda sub: sub.length)

    def head_bounds(self) -> list[int]:
        """What each KV head may hold after a forward: its budget + buffer (a joint head's: the last split's width
        + room)."""
        return self._per_head(lambda sub: sub.budget + sub.room)

    def _per_head(self, value) -> list[int]:
        out = [0] * self.heads
        for (heads, _), sub in zip(self.plan.groups, self.sublayers):
            for h in heads:
                out[h] = value(sub)
        return out

    def kept_mask(self) -> torch.Tensor:
        first = self.sublayers[0].kept_mask()
        out = first.new_zeros(first.shape[0], self.heads, first.shape[-1])
        for (kv, _), sub in zip(self.index(first.device), self.sublayers):
            out[:, kv] = sub.kept_mask()
        return out

    def get_seq_length(self) -> int:
        return self.sublayers[0].get_seq_length()

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.sublayers[0].get_mask_sizes(query)

    def get_max_length(self) -> int:
        return -1

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{name}": t for i, sub in enumerate(self.sublayers) for name, t in sub.slot_tensors().items()}

    def reset(self) -> None:
        for sub in self.sublayers:
            sub.reset()
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each("reorder_cache", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each("batch_select_indices", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each("batch_repeat_interleave", repeats)

    def _each(self, method: str, arg) -> None:
        for sub in self.sublayers:
            getattr(sub, method)(arg)


def split_evict(heads: list[CompressedLayer], total: int, floor: int, buffer: int) -> bool:
    """Ada-KV's joint eviction of `heads` (one KV head each, the joint `CompressedLayer`s of one layer, or of every
    layer of a shared budget): once they hold more than total + buffers together (or one holds more than its last
    width + buffer), one top-k over all their slots (`split_budget`) gives each head its count, read back to the
    host (one read per eviction: the new lengths are data-dependent shapes), and each head is cut to its count with
    the usual one gather. Returns whether it evicted."""
    n = len(heads)
    if any(sub.held for sub in heads):  # their tokens wait for a replay to score them (`h2o.replay`)
        return False
    if (sum(sub.length for sub in heads) <= total + n * buffer
            and all(sub.length <= sub.budget + buffer for sub in heads)):
        return False
    counts = split_budget([sub.priorities() for sub in heads], total, floor)
    # each row as if it ran alone: only a row holding more than its total budget + buffers evicts
    real = torch.stack([sub.valid.sum(-1) for sub in heads], dim=1)  # [B, H]
    counts = torch.where(real.sum(-1, keepdim=True) > total + n * buffer, counts, real)
    rows = counts.tolist()  # the one host read of an eviction: the heads' new lengths are data-dependent shapes
    widths = [max(row[h] for row in rows) for h in range(n)]
    # the heads grow together, one slot each a token: the next split comes once they pass total + buffers, so
    # no head needs more than its width + `room` slots before it (the uniform rule's buffer, after a split)
    room = max(0, (total + n * buffer - sum(widths)) // n)
    for h, sub in enumerate(heads):
        # rows given fewer tokens than the head's width get unused slots first: masked like padding
        sub.evict_to(counts[:, h], widths[h], uneven=min(row[h] for row in rows) < widths[h], room=room)
    return True
