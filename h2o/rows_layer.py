"""`RowsLayer`: a joint (Ada-KV) layer of a batch, one `HeadGroupLayer` per row, so that each row splits its budget as
it would alone (the layer kind of joint allocations)."""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicLayer

from .compressed_layer import CompressedLayer
from .handover import leave_pending
from .head_group_layer import HeadGroupLayer
from .policies import Policy
from .policies.allocation import LayerPlan


class RowsLayer(HeadGroupLayer):
    """A joint (Ada-KV) layer of a batch, or one of fixed head groups fitted to a short context (`h2o.context_fit`):
    one `HeadGroupLayer` per row, made at the first forward, so each row splits its own budget across its heads (or
    fits its groups' budgets to its own context) exactly as it would alone, and each (row, head) holds only that row's
    tokens for that head. A batch of B rows holds at most B x (total + heads x buffer) slots, the uniform rule's
    bound (one [B, H, L] layout would hold, per head, its widest row's share in every row). h2o's attention runs
    once per row and head; beam search and batch selection move whole rows (a row chosen twice is copied)."""

    def __init__(self, plan: LayerPlan, rule: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        DynamicLayer.__init__(self)
        self.plan, self.rule, self.reindex, self.rope = plan, rule, reindex, rope
        self.heads = sum(len(heads) for heads, _ in plan.groups)
        self.buffer, self.is_initialized = buffer, False
        self.rows: list[HeadGroupLayer] = []
        self.held = False  # a replaying rule's forward, waiting for its replay (`CompressedCache.hold`)
        self.shared = None  # a budget shared with other layers (`h2o.shared_budget.SharedBudget`), which evicts them
        # fixed head groups fitted to a short context (`h2o.context_fit.ContextFit`), and this layer's first group's
        # place in the plans: each row's groups get that row's fit
        self.context_fit, self.fit_offset = None, 0

    @property
    def sublayers(self) -> list[CompressedLayer]:
        return [sub for row in self.rows for sub in row.sublayers]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        if not self.rows:
            self.rows = [HeadGroupLayer(self.plan, self.rule, self.buffer, self.reindex, self.rope)
                         for _ in range(batch)]
            for sub in self.sublayers:
                sub.held = self.held
            if self.context_fit is not None:
                for b, row in enumerate(self.rows):
                    for g, sub in enumerate(row.sublayers):
                        sub.context_fit, sub.fit_group = self.context_fit.row(b), self.fit_offset + g
        elif len(self.rows) != batch:
            raise ValueError(f"a cache holding {len(self.rows)} rows was given a forward of {batch} rows: "
                             "reset() it (or make a new cache) for a new batch")
        for b, row in enumerate(self.rows):
            row.update(key_states[b:b + 1], value_states[b:b + 1])
        self.is_initialized = True
        leave_pending(self)
        return self.keys, self.values

    def attend(self, call, query, attention_mask):
        """Each row's head groups on that row's query, mask and position ids; then the rows' splits (each row its
        own, or the shared budget's, once every layer sharing it has been observed)."""
        n = len(self.rows)
        parts = [row.attend(*call.row(b, n, query, attention_mask), split=False) for b, row in enumerate(self.rows)]
        self.observed()
        return parts[0] if n == 1 else torch.cat(parts)

    def observed(self) -> bool:
        if self.shared is not None:
            return self.shared.observed(self)
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
        if self.shared is not None:
            self.shared.reset()
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
