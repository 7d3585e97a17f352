"""Value-aware token pruning, VATP (Guo et al., 2024): H2O's accumulated attention times the value's L1 norm.

A token that draws attention but carries a near-zero value changes the output little; weighting by
||v||_1 keeps the tokens that matter to the output. Sinks are pinned explicitly (their values are
small, so VATP alone would drop them). The attention part uses H2O's rules (`sum`, the paper's,
or `mean`, the default here as for H2O).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import register_policy
from .base import Policy, check_sizes
from .h2o import DEFAULT_SCORE, check_rule, scored, scored_name

_NAME = re.compile(r"vatp_(\d+)_(\d+)_(\d+)(?:_(\w+))?")


@register_policy
@dataclass(frozen=True)
class VATP(Policy):
    NAME = "vatp"
    GRAMMAR = "vatp_<sinks>_<recent>_<budget>[_mean|_sum]"
    EXAMPLE = "vatp_4_32_256"
    observes = frozenset({"mass"})
    state = ("score", "value_norm")
    has_score = True

    sinks: int
    recent: int
    budget: int
    score: str = DEFAULT_SCORE

    def __post_init__(self):
        check_sizes(self)
        check_rule(self)

    @classmethod
    def from_name(cls, name, score=None):
        return scored_name(cls, name, score, _NAME)

    @property
    def name(self) -> str:
        return f"vatp_{self.sinks}_{self.recent}_{self.budget}_{self.score}"

    def initial_state(self, keys, values):
        b, h, q, _ = keys.shape
        return {"score": keys.new_zeros(b, h, q, dtype=torch.float32), "value_norm": values.float().abs().sum(dim=-1)}

    def update(self, state, obs, seen):
        state["score"] += obs.mass

    def rank(self, state, times, seen, **slots):
        return scored(self, state["score"], times, seen) * state["value_norm"]
