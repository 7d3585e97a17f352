"""StreamingLLM (Xiao et al., 2023): the first `sinks` tokens (attention sinks) and the last `window`."""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Policy, check_sizes

@register_policy
@dataclass(frozen=True)
class Streaming(Policy):
    NAME = "streaming"
    GRAMMAR = "streaming_<sinks>_<window>"
    EXAMPLE = "streaming_4_252"
    PATTERN = r"_(?P<sinks>\d+)_(?P<window>\d+)"

    sinks: int
    window: int

    def __post_init__(self):
        check_sizes(self, "window")

    @classmethod
    def from_name(cls, name, score=None):
        m = cls.match(name)
        return cls(int(m["sinks"]), int(m["window"])) if m else None

    @classmethod
    def sized(cls, sinks, recent, budget):
        return cls(sinks, budget - sinks)  # the window is all the budget the sinks leave

    def with_budget(self, budget):
        return type(self)(self.sinks, budget - self.sinks)

    @property
    def name(self) -> str:
        return f"streaming_{self.sinks}_{self.window}"

    @property
    def budget(self) -> int:
        return self.sinks + self.window

    @property
    def recent(self) -> int:
        return self.window

    def rank(self, state, times, seen, **slots):
        # Outside sinks and window nothing is kept once a row holds more than `budget` tokens;
        # ranking by arrival only matters for ties and is the natural order.
        return times.float()
