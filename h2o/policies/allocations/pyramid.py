"""PyramidKV (`pyramid_<beta>`): layer budgets that fall linearly with depth."""

from __future__ import annotations

from dataclasses import dataclass

from .plan import Allocation, LayerPlan, register_allocation

@register_allocation
@dataclass(frozen=True)
class Pyramid(Allocation):
    """PyramidKV: budgets fall linearly with depth, mean at most the budget."""

    NAME, GRAMMAR, EXAMPLE = "pyramid", "pyramid_<beta>", "pyramid_20"
    HELP = "PyramidKV: layer budgets fall linearly with depth to max(budget / <beta>, sinks + recent + 1)"
    beta: float = 20.0

    def __post_init__(self):
        if not self.beta >= 1:
            raise ValueError(f"pyramid_<beta>: beta must be >= 1, got {self.beta}")

    @property
    def name(self) -> str:
        return f"pyramid_{self.beta:g}"

    def budgets(self, rule, layers) -> list[int]:
        b = rule.budget
        low = min(b, max(int(b // self.beta), rule.sinks + rule.recent + 1))
        high = 2 * b - low
        if layers == 1:
            return [b]
        return [int(high - (high - low) * i / (layers - 1)) for i in range(layers)]

    def plan(self, rule, layers, heads, scores=None):
        return [LayerPlan(((tuple(range(heads)), b),)) for b in self.budgets(rule, layers)]
