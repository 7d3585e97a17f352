"""`ContextFit`: a fixed plan's head budgets fitted to the context each row has seen (head and layer budgets).

A fixed plan (`retrieval_…`, `induction_…`, `ablation_…`, `headkv_…`, `pyramid_…`) gives each group of KV heads a
budget of its own, some above the uniform rule's and some below. On a context shorter than the largest of them, a head
cannot hold more tokens than it has seen, so the plan as written would hold fewer tokens in all than the uniform rule
(its large heads hold the whole context, its small heads their small budgets). `ContextFit` gives what a head cannot
hold to the others (`allocation.context_budgets`, the same split in every layer) from the tokens a row has really seen
(its padding left out); from the largest budget on, the plan itself.

Rows of a batch see different numbers of real tokens, so their splits differ, and a short row gives its small heads
more than a long row does: one [B, H, L] layout would hold, per group, its widest row's share in every row, past the
uniform rule's bytes. So a fitted plan's layers are `RowsLayer`s (one `HeadGroupLayer` per row, as the joint plans):
each row keeps exactly what it keeps alone, and holds only that. Each row has one `RowFit`, shared by its groups in
every layer, which each group asks at its eviction check (`CompressedLayer.evict_if_needed`). What it costs: a
dictionary lookup per group and forward while the row's context is shorter than the largest budget; in a row that
has seen padding, one read of its padding count back to the host per forward in that phase; nothing after it.
"""

from __future__ import annotations

import copy

from .policies.allocation import context_budgets


class ContextFit:
    """The fitted budgets of a cache's fixed head groups: `planned`, per group of every layer in order, (its budget,
    its number of KV heads)."""

    def __init__(self, planned: list[tuple[int, int]]):
        self.planned = [budget for budget, _ in planned]
        self.heads = [n for _, n in planned]
        self.largest = max(self.planned)
        self._splits: dict[int, list[int]] = {}  # tokens seen -> each group's budget
        self.rows: list[RowFit] = []

    def split(self, seen: int) -> list[int]:
        """Each group's budget on a context of `seen` real tokens: its heads' least share (a group holds one budget,
        never more than any of its heads is given)."""
        if seen >= self.largest:
            return self.planned
        if seen not in self._splits:
            shares = context_budgets([b for b, n in zip(self.planned, self.heads) for _ in range(n)], seen)
            out, start = [], 0
            for n in self.heads:
                out.append(min(shares[start:start + n]))
                start += n
            self._splits[seen] = out
        return self._splits[seen]

    def row(self, b: int) -> RowFit:
        """Row b's fit, shared by its groups in every layer (made by the first layer that makes its rows)."""
        while len(self.rows) <= b:
            self.rows.append(RowFit(self))
        return self.rows[b]

    def forget_rows(self) -> None:
        """A new prompt (`CompressedCache.reset`): the next forward's rows start afresh."""
        self.rows = []


class RowFit:
    """One row's fitted budgets: each group of the row (in every layer) asks `budget(group)` at its eviction check."""

    def __init__(self, fit: ContextFit):
        self.fit = fit
        self._real = None  # (tokens seen, the row's real tokens seen)
        self._past = False  # the row has seen at least the largest budget: the plan itself from now on

    def __deepcopy__(self, memo) -> RowFit:
        """A row copied (beam search's row chosen twice, a fork of the cache): its own memory of what it has seen; the
        plans copied with the copy's other objects (one per cache fork: `memo`)."""
        new = RowFit.__new__(RowFit)
        memo[id(self)] = new
        new.fit = copy.deepcopy(self.fit, memo)
        new._real, new._past = self._real, self._past
        return new

    def budget(self, group) -> int | None:
        """`group`'s budget now; None once the row has seen at least the largest budget (the plan's own)."""
        if self._past:
            return None
        seen = self._real_seen(group)
        if seen >= self.fit.largest:
            self._past = True
            return None
        return self.fit.split(seen)[group.fit_group]

    def _real_seen(self, group) -> int:
        """The row's real tokens seen (its padding left out): read from the group's padding count (every group of
        the row sees the same) once per forward, and only where padding was ever seen."""
        if not group.padded:
            return group.seen
        if self._real is None or self._real[0] != group.seen:
            self._real = (group.seen, group.seen - int(group.pads[0]))
        return self._real[1]
