"""One budget for the whole cache (`global_<floor>`): every layer's and KV head's slots ranked together."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from .plan import Allocation, LayerPlan, register_allocation

@register_allocation
@dataclass(frozen=True)
class Global(Allocation):
    """One budget for the whole cache: every layer's and KV head's slots ranked together, a floor per head."""

    NAME, GRAMMAR, EXAMPLE = "global", "global_<floor>", "global_0.2"
    HELP = ("one budget for the whole cache: every layer's and KV head's slots ranked together by one top-k after "
            "each forward, each head keeping at least <floor> x budget")
    floor: float = 0.2
    across_layers: ClassVar[bool] = True

    def __post_init__(self):
        if not 0 <= self.floor <= 1:
            raise ValueError(f"global_<floor>: floor must lie in [0, 1], got {self.floor}")

    @property
    def name(self) -> str:
        return f"global_{self.floor:g}"

    def plan(self, rule, layers, heads, scores=None):
        """Every layer joint over its heads; the layers' totals add up to the shared budget (the cache's)."""
        floor = max(rule.sinks + rule.recent, math.ceil(self.floor * rule.budget))
        groups = tuple(((h,), rule.budget) for h in range(heads))
        return [LayerPlan(groups, joint=True, total=heads * rule.budget, floor=floor) for _ in range(layers)]
