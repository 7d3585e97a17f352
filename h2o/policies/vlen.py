"""keys_values' h2o-vlen (awslabs/keys_values): H2O over value-weighted attention, renormalised per query.

For each new query, the group-averaged attention row is weighted by each key's value length ||v||_2 and
renormalised to sum to one (keys_values scales it by the number of queries, a constant that does not change
the ranking); a key accumulates its share from every query that saw it, as H2O accumulates attention. Unlike
VATP (score x ||v||_1 after summing), a query's weights stay a distribution: a key gains only at the expense
of the other keys that query saw. Sinks are pinned explicitly (their values are small). Rules `mean` (the
default, as for H2O) and `sum`.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .h2o import H2O, scored


@register_policy
@dataclass(frozen=True)
class VLen(H2O):
    NAME = "vlen"
    GRAMMAR = "vlen_<sinks>_<recent>_<budget>[_mean|_sum]"
    EXAMPLE = "vlen_4_32_256"
    observes = frozenset({"vmass"})

    def update(self, state, obs, seen):
        state["score"] += obs.vmass

    def rank(self, state, times, seen, **slots):
        return scored(self, state["score"], times, seen)
