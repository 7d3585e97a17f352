"""CAOTE (Goel et al., 2025): evict the token whose removal changes the attention output least.

For the newest query with attention a over the kept tokens and output o = sum_j a_j v_j, removing token
j (and renormalising the rest) moves the output by a_j / (1 - a_j) * ||v_j - o||_2: CAOTE keeps the
tokens with the largest such error. Per KV head, `a` is the newest query's row averaged over the group's
query heads (as TOVA here) and `o` is computed from it; the score is recomputed from the kept values at
every eviction.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Sized


@register_policy
@dataclass(frozen=True)
class CAOTE(Sized):
    NAME = "caote"
    GRAMMAR = "caote_<sinks>_<recent>_<budget>"
    EXAMPLE = "caote_4_32_256"
    observes = frozenset({"last"})
    state = ("attention",)

    def update(self, state, obs, seen):
        state["attention"].copy_(obs.last)

    def rank(self, state, times, seen, values=None, valid=None, **slots):
        if values is None:
            raise ValueError("caote ranks by the kept values: pass values= to keep_indices")
        a = state["attention"]
        if valid is not None:
            a = a * valid[:, None, :]
        v = values.float()
        output = (a.unsqueeze(-1) * v).sum(dim=-2, keepdim=True)  # [B, H, 1, D]
        return a / (1 - a).clamp_min(1e-6) * (v - output).norm(dim=-1)
