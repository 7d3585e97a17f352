"""A transformers `Cache` whose layers keep a bounded set of tokens chosen by a policy.

Each `CompressedLayer` holds, per row and KV head, the kept keys and values in temporal order,
plus per-slot bookkeeping that moves with them through one gather: the arrival index of the token
(`times`), the policy's named float32 state (`state`, e.g. H2O's accumulated attention "score"),
and per row which slots are padding (`valid`). `keys`/`values` always hold exactly the kept tokens.

Eviction is lazy: after attention, a layer holding more than `budget + buffer` tokens is cut
back to exactly `budget`. The order of one forward (update, then the attention function's
`prepare` and `observe`) is the contract written in `h2o.policies.base`; a layer updated twice
without being observed raises, so a compressed cache can never run without its bound.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .policies import Policy
from .policies.allocation import Allocated, LayerPlan, head_tables, split_budget
from .compressed_layer import CompressedLayer, UnobservedError  # noqa: F401 (UnobservedError: importable here, as before)
from .handover import leave_pending, take_pending  # noqa: F401 (take_pending: importable here, as before)


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
        self.sublayers = [CompressedLayer(rule.with_budget(budget), buffer, reindex, rope, joint=plan.joint,
                                          rule_budget=rule.budget)
                          for _, budget in plan.groups]
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
        for (kv, _), sub in zip(self.index(key_states.device), self.sublayers):
            sub.update(key_states.index_select(1, kv), value_states.index_select(1, kv))
        self.is_initialized = True
        self.keys, self.values = self.sublayers[0].keys, self.sublayers[0].values  # how attention finds the layer
        leave_pending(self)
        return self.keys, self.values

    def observed(self) -> bool:
        """After every group's attention: a joint layer over its total budget + buffers splits and evicts."""
        subs = self.sublayers
        if not self.plan.joint or (sum(sub.length for sub in subs) <= self.plan.total + self.heads * self.buffer
                                   and all(sub.length <= sub.budget + self.buffer for sub in subs)):
            return False
        counts = split_budget([sub.priorities() for sub in subs], self.plan.total, self.plan.floor)
        # each row as if it ran alone: only a row holding more than its total budget + buffers evicts
        real = torch.stack([sub.valid.sum(-1) for sub in subs], dim=1)  # [B, H]
        counts = torch.where(real.sum(-1, keepdim=True) > self.plan.total + self.heads * self.buffer, counts, real)
        rows = counts.tolist()  # the one host read of an eviction: the heads' new lengths are data-dependent shapes
        widths = [max(row[h] for row in rows) for h in range(len(subs))]
        # the heads grow together, one slot each a token: the next split comes once they pass total + buffers, so
        # no head needs more than its width + `room` slots before it (the uniform rule's buffer, after a split)
        room = max(0, (self.plan.total + self.heads * self.buffer - sum(widths)) // self.heads)
        for h, sub in enumerate(subs):
            # rows given fewer tokens than the head's width get unused slots first: masked like padding
            sub.evict_to(counts[:, h], widths[h], uneven=min(row[h] for row in rows) < widths[h], room=room)
        return True

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
        self.keys = self.values = None
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
        if self.is_initialized:
            self.keys, self.values = self.sublayers[0].keys, self.sublayers[0].values


class RowsLayer(HeadGroupLayer):
    """A joint (Ada-KV) layer of a batch: one `HeadGroupLayer` per row, made at the first forward, so each row
    splits its own budget across its heads exactly as it would alone, and each (row, head) holds only that row's
    tokens for that head. A batch of B rows holds at most B x (total + heads x buffer) slots, the uniform rule's
    bound (one [B, H, L] layout would hold, per head, its widest row's share in every row). h2o's attention runs
    once per row and head; beam search and batch selection move whole rows (a row chosen twice is copied)."""

    def __init__(self, plan: LayerPlan, rule: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        DynamicLayer.__init__(self)
        self.plan, self.rule, self.reindex, self.rope = plan, rule, reindex, rope
        self.heads = sum(len(heads) for heads, _ in plan.groups)
        self.buffer, self.is_initialized = buffer, False
        self.rows: list[HeadGroupLayer] = []

    @property
    def sublayers(self) -> list[CompressedLayer]:
        return [sub for row in self.rows for sub in row.sublayers]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        if not self.rows:
            self.rows = [HeadGroupLayer(self.plan, self.rule, self.buffer, self.reindex, self.rope)
                         for _ in range(batch)]
        elif len(self.rows) != batch:
            raise ValueError(f"a cache holding {len(self.rows)} rows was given a forward of {batch} rows: "
                             "reset() it (or make a new cache) for a new batch")
        for b, row in enumerate(self.rows):
            row.update(key_states[b:b + 1], value_states[b:b + 1])
        self.is_initialized = True
        self.keys, self.values = self.rows[0].keys, self.rows[0].values
        leave_pending(self)
        return self.keys, self.values

    def observed(self) -> bool:
        return any([row.observed() for row in self.rows])

    @property
    def length(self) -> int:
        return max((row.length for row in self.rows), default=0)

    @property
    def seen(self) -> int:
        return self.rows[0].seen if self.rows else 0

    def head_lengths(self) -> list[int]:
        """Kept tokens per KV head, in head order: the row holding most in that head."""
        return [max(n) for n in zip(*(row.head_lengths() for row in self.rows))] if self.rows else [0] * self.heads

    def head_bounds(self) -> list[int]:
        if not self.rows:
            return [budget + self.buffer for heads, budget in self.plan.groups for _ in heads]
        return [max(n) for n in zip(*(row.head_bounds() for row in self.rows))]

    def kept_mask(self) -> torch.Tensor:
        return torch.cat([row.kept_mask() for row in self.rows])

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # each row reads only the mask's last q columns (which new tokens are padding): any kept length serves
        q = query if isinstance(query, int) else query.shape[0]
        return self.length + q, self.seen - self.length

    def reset(self) -> None:
        self.rows = []
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take([b for b in range(len(self.rows)) for _ in range(repeats)])

    def _take(self, index) -> None:
        """Rows `index` (in that order): a row taken more than once is copied, so rows never share buffers."""
        if not self.rows:
            return
        taken, new = set(), []
        for b in torch.as_tensor(index).flatten().tolist():
            new.append(copy.deepcopy(self.rows[b]) if b in taken else self.rows[b])
            taken.add(b)
        self.rows = new
        self.keys, self.values = self.rows[0].keys, self.rows[0].values


class CompressedCache(Cache):
    """A `Cache` of one layer per model layer; a `full` policy uses plain `DynamicLayer`s."""

    def __init__(self, policy: Policy | Allocated, num_layers: int, positions: str = "original", buffer: int = 64,
                 rope: tuple | None = None, kv_heads: int | None = None, head_scores=None, static: bool = False):
        reindex = positions == "reindex"
        if head_scores is not None:  # checked whichever policy: malformed scores are an error, never ignored
            head_scores = head_tables(head_scores)
        if static:  # the compile-friendly layout (h2o.static)
            check_static(policy, positions)
            from .static import StaticLayer

            layers = [StaticLayer(policy, buffer) for _ in range(num_layers)]
        elif isinstance(policy, Allocated):  # head and layer budgets: one plan per layer
            if kv_heads is None:
                raise ValueError(f"{policy.name}: an allocation needs the model's number of KV heads (kv_heads=)")
            layers = [CompressedLayer(policy.rule.with_budget(plan.groups[0][1]), buffer, reindex, rope,
                                      rule_budget=policy.rule.budget)
                      if plan.uniform else (RowsLayer if plan.joint else HeadGroupLayer)(plan, policy.rule, buffer,
                                                                                          reindex, rope)
                      for plan in policy.plan(num_layers, kv_heads, head_scores)]
        elif policy.evicts:
            layers = [CompressedLayer(policy, buffer, reindex, rope) for _ in range(num_layers)]
        else:
            layers = [DynamicLayer() for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.policy, self.positions, self.buffer, self.static = policy, positions, buffer, static

    def __repr__(self) -> str:
        static = ", static" if self.static else ""
        return f"CompressedCache({self.policy.name}, positions={self.positions}, buffer={self.buffer}{static})"

    def slot_positions(self, q: int, device) -> torch.Tensor | None:
        """reindex mode: the position ids [1, q] that make the model rotate the next forward's q tokens at their
        slots, so that no layer re-rotates them (`h2o.make_cache` installs the model hook that passes them);
        None where they do not apply (original positions, a policy that never evicts, layers holding different
        numbers of tokens). Each layer checks, in its `prepare`, that it got these positions (else it re-rotates)."""
        if self.positions != "reindex" or not self.policy.evicts:
            return None
        layers = self.compressed_layers()  # none yet: an Ada-KV cache of a batch makes its rows at the first forward
        kept = layers[0].length if layers else 0
        if any(layer.length != kept for layer in layers):
            return None
        for layer in layers:
            layer.model_slots = (layer.seen, kept)
        return torch.arange(kept, kept + q, device=device).unsqueeze(0)

    def compressed_layers(self) -> list[CompressedLayer]:
        """Every `CompressedLayer`: one per model layer, or one per head group of a `HeadGroupLayer`."""
        return [sub for layer in self.layers for sub in getattr(layer, "sublayers", [layer])
                if isinstance(sub, CompressedLayer)]

    def kept_lengths(self) -> list[int]:
        """Tokens each layer holds now (its longest head's, where heads hold different numbers)."""
        return [layer.length if isinstance(layer, (CompressedLayer, HeadGroupLayer)) else
                layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
                for layer in self.layers]

    def head_lengths(self) -> list[list[int]]:
        """Tokens each KV head of each layer holds now."""
        return [layer.head_lengths() if isinstance(layer, HeadGroupLayer) else
                [length] * _heads(layer) for layer, length in zip(self.layers, self.kept_lengths())]

    def head_bounds(self) -> list[list[int | None]]:
        """What each KV head may hold after any forward (budget + buffer; None: a full cache's layer)."""
        return [layer.head_bounds() if isinstance(layer, HeadGroupLayer) else
                [layer.budget + layer.buffer if isinstance(layer, CompressedLayer) else None] * _heads(layer)
                for layer in self.layers]

    def evicted(self) -> bool:
        """Whether any head of any layer holds fewer tokens than it has seen."""
        return any(layer.length < layer.seen for layer in self.compressed_layers())

    def kv_bytes(self, bookkeeping: bool = True) -> int:
        """Exact bytes held by the cache: keys, values and (`bookkeeping`) the per-slot bookkeeping of every head
        (a compressed layer's buffers at their allocated capacity, not only the filled slots: up to buffer + 1
        free slots per head after an eviction, plus the geometric growth of a head that has not evicted yet; a
        head group's buffers hold only its own heads, and each group has its own validity row and pad counts)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, (CompressedLayer, HeadGroupLayer)):
                tensors = [t for name, t in layer.slot_tensors().items()
                           if bookkeeping or name.rpartition(".")[2] in ("keys", "values")]
            else:
                tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                           if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def check_static(policy, positions: str) -> None:
    """What the static (compile-friendly) layout holds: a uniform evicting rule with original positions."""
    if isinstance(policy, Allocated):
        raise ValueError(f"{policy.name}: head and layer budgets hold different numbers of tokens per head; the "
                         "static (compile-friendly) cache holds a uniform rule. Use static=False for allocations")
    if not policy.evicts:
        raise ValueError("a static full cache is transformers' StaticCache (cache_implementation='static'); "
                         "static=True is for evicting rules")
    if positions != "original":
        raise ValueError("the static (compile-friendly) cache keeps original positions: its slots are not in "
                         "arrival order, so positions='reindex' (keys rotated by slot) needs static=False")


def _heads(layer) -> int:
    keys = getattr(layer, "keys", None)
    return keys.shape[1] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
