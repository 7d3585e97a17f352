"""Ada-KV (`adakv_<floor>`): a layer's budget split across its KV heads at every eviction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .plan import Allocation, LayerPlan, register_allocation

@register_allocation
@dataclass(frozen=True)
class AdaKV(Allocation):
    """Ada-KV: a layer's budget split across its heads at every eviction, with a floor per head."""

    NAME, GRAMMAR, EXAMPLE = "adakv", "adakv_<floor>", "adakv_0.2"
    HELP = ("Ada-KV: at every eviction a layer's budget is split across its KV heads by one top-k over the rule's "
            "priorities, each head keeping at least <floor> x budget")
    floor: float = 0.2

    def __post_init__(self):
        if not 0 <= self.floor <= 1:
            raise ValueError(f"adakv_<floor>: floor must lie in [0, 1], got {self.floor}")

    @property
    def name(self) -> str:
        return f"adakv_{self.floor:g}"

    def plan(self, rule, layers, heads, scores=None):
        floor = max(rule.sinks + rule.recent, math.ceil(self.floor * rule.budget))
        groups = tuple(((h,), rule.budget) for h in range(heads))
        return [LayerPlan(groups, joint=heads > 1, total=heads * rule.budget, floor=floor) for _ in range(layers)]
