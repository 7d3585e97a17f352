"""A2SF (Jo & Shin, 2024): H2O's accumulated attention with a forgetting factor.

score(k) = sum over the queries q that saw k of gamma^(n - q) a(q, k), n the newest query: old
attention fades, so a token must keep being attended to. gamma = 1 is H2O's sum; gamma -> 0 tends
to TOVA. Within one forward of several queries each query is weighted gamma^(q_last - q) in the
summed mass (`query_weights`), and the state decays by gamma^q before it is added, so chunked and
token-by-token feeding give the same scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_policy
from .base import Sized

DEFAULT_GAMMA = 0.95


@register_policy
@dataclass(frozen=True)
class A2SF(Sized):
    NAME = "a2sf"
    GRAMMAR = "a2sf_<sinks>_<recent>_<budget>_<gamma>"
    EXAMPLE = "a2sf_4_32_256_0.95"
    PATTERN = Sized.PATTERN + r"_(?P<gamma>[0-9]*\.?[0-9]+)"
    observes = frozenset({"mass"})
    state = ("score",)

    gamma: float = DEFAULT_GAMMA

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not 0 < self.gamma <= 1:
            raise ValueError(f"a2sf: gamma must be a number in (0, 1], got {self.gamma!r}")

    @classmethod
    def from_name(cls, name, score=None):
        m = cls.match(name)
        return cls(int(m["sinks"]), int(m["recent"]), int(m["budget"]), float(m["gamma"])) if m else None

    @property
    def name(self) -> str:
        return f"a2sf_{self.sinks}_{self.recent}_{self.budget}_{self.gamma:g}"

    def query_weights(self, q, device):
        return self.gamma ** torch.arange(q - 1, -1, -1, device=device, dtype=torch.float64)

    def update(self, state, obs, seen):
        state["score"].mul_(self.gamma ** obs.queries).add_(obs.mass)

    def rank(self, state, times, seen, **slots):
        return state["score"]
