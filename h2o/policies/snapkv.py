"""SnapKV (Li et al., 2024): keep the prompt keys that the last `window` prompt queries attend to.

Question-aware prefill compression: in a prompt that ends with the question, the last queries already
look at what the answer needs. A key's score is the attention it received from the last `window`
queries of each forward (summed over the group's query heads), and it is ranked by that score
average-pooled over neighbouring slots (kernel 5, as kvpress), so a needle's neighbours stay with it.
After the prompt, every new query has weight 1, so the tokens that follow are ranked by the attention
they accumulate (H2O's sum rule): SnapKV for the prompt composed with H2O for decoding. The window must
fit in the budget.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register_policy
from .base import Sized

_NAME = re.compile(r"snapkv_(\d+)_(\d+)_(\d+)_(\d+)")
DEFAULT_WINDOW = 16
KERNEL = 5


@register_policy
@dataclass(frozen=True)
class SnapKV(Sized):
    NAME = "snapkv"
    GRAMMAR = "snapkv_<sinks>_<recent>_<budget>_<window>"
    EXAMPLE = "snapkv_4_32_256_16"
    observes = frozenset({"mass"})
    state = ("score",)

    window: int = DEFAULT_WINDOW

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or not 1 <= self.window <= self.budget:
            raise ValueError(f"snapkv: the observation window must be an int in [1, budget = {self.budget}], "
                             f"got {self.window!r}")

    @classmethod
    def from_name(cls, name, score=None):
        m = _NAME.fullmatch(name)
        return cls(int(m[1]), int(m[2]), int(m[3]), int(m[4])) if m else None

    @classmethod
    def sized(cls, sinks, recent, budget):
        return cls(sinks, recent, budget, min(DEFAULT_WINDOW, budget))

    @property
    def name(self) -> str:
        return f"snapkv_{self.sinks}_{self.recent}_{self.budget}_{self.window}"

    def query_weights(self, q, device):
        return (torch.arange(q, device=device) >= q - self.window).to(torch.float32)

    def update(self, state, obs, seen):
        state["score"] += obs.mass

    def rank(self, state, times, seen, **slots):
        b, h, length = state["score"].shape
        pooled = F.avg_pool1d(state["score"].reshape(b * h, 1, length), KERNEL, stride=1, padding=KERNEL // 2,
                              count_include_pad=False)
        return pooled.view(b, h, length)
