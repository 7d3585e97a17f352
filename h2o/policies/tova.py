"""TOVA (Oren et al., 2024, schwartz-lab-NLP/TOVA): keep the keys the newest query attends to most.

Per KV head, the newest query's attention row averaged over the group's query heads (as keys_values
does; kvpress and the reference average over all heads of the layer, a per-layer choice). The
score is overwritten at every forward: only the latest query counts. Use buffer 0 for the paper's
one eviction per step.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Sized


@register_policy
@dataclass(frozen=True)
class TOVA(Sized):
    NAME = "tova"
    GRAMMAR = "tova_<sinks>_<recent>_<budget>"
    EXAMPLE = "tova_4_32_256"
    observes = frozenset({"last"})
    state = ("score",)

    def update(self, state, obs, seen):
        state["score"].copy_(obs.last)

    def rank(self, state, times, seen, **slots):
        return state["score"]
