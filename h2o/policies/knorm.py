"""Key norm (Devoto et al., 2024; kvpress `KnormPress`): keep the keys with the lowest L2 norm.

Low-norm keys tend to draw high attention, so the norm is a free proxy for it: nothing is observed
from attention (the attention function computes no scores for this rule). Reported to hold up to
about 50% eviction only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import register_policy
from .base import Policy, check_sizes

_NAME = re.compile(r"knorm_(\d+)_(\d+)_(\d+)")


@register_policy
@dataclass(frozen=True)
class KNorm(Policy):
    NAME = "knorm"
    GRAMMAR = "knorm_<sinks>_<recent>_<budget>"
    EXAMPLE = "knorm_4_32_256"
    state = ("key_norm",)

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
        return f"knorm_{self.sinks}_{self.recent}_{self.budget}"

    def initial_state(self, keys, values):
        return {"key_norm": keys.float().norm(dim=-1)}

    def rank(self, state, times, seen, **slots):
        return -state["key_norm"]
