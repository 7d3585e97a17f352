"""TOVA (Oren et al., 2024, schwartz-lab-NLP/TOVA): keep the keys the newest query attends to most.

Per KV head, the newest query's attention row averaged over the group's query heads (as keys_values
does; kvpress and the reference average over all heads of the layer, a per-layer choice). The
score is overwritten at every forward: only the latest query counts. Use buffer 0 for the paper's
one eviction per step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import register_policy
from .base import Policy, check_sizes

_NAME = re.compile(r"tova_(\d+)_(\d+)_(\d+)")


@register_policy
@dataclass(frozen=True)
class TOVA(Policy):
    NAME = "tova"
    GRAMMAR = "tova_<sinks>_<recent>_<budget>"
    EXAMPLE = "tova_4_32_256"
    observes = frozenset({"last"})
    state = ("score",)

    sinks: int
    recent: int
    budget: int

    def __post_init__(self):
        check_sizes(self)

    @classmethod
    def from_name(cls, name, score=None):
        m = _NAME.fullmatch(name)
        return cls(int(m[1]), int(m[2]), int(m[3])) if m else None

    @property
    def name(self) -> str:
        return f"tova_{self.sinks}_{self.recent}_{self.budget}"

    def update(self, state, obs, seen):
        state["score"].copy_(obs.last)

    def rank(self, state, times, seen, **slots):
        return state["score"]
