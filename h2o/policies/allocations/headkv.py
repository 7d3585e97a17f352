"""HeadKV (`headkv_<floor>[_<factor>]`): a floor and a cap per KV head, the rest water-filled by retrieval score."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import Policy
from .plan import Allocation, LayerPlan, head_tables, register_allocation, water_fill

@register_allocation
@dataclass(frozen=True)
class HeadKV(Allocation):
    """HeadKV: a floor and a cap per head; the rest of the cache's budget water-filled in proportion to each head's
    retrieval score."""

    NAME, GRAMMAR, EXAMPLE = "headkv", "headkv_<floor>[_<factor>]", "headkv_0.2"
    HELP = ("HeadKV: every KV head keeps <floor> x budget, the rest of the cache's budget is water-filled by the "
            "retrieval head score under a cap of <factor> x budget (default 4)")
    score: ClassVar[str] = "retrieval"
    floor: float = 0.2
    factor: float = 4.0  # the cap: factor x budget tokens a head

    DEFAULT_FACTOR: ClassVar[float] = 4.0

    def __post_init__(self):
        if not 0 <= self.floor <= 1:
            raise ValueError(f"headkv_<floor>: floor must lie in [0, 1], got {self.floor}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"headkv_<floor>_<factor>: factor must be a number >= 1, got {self.factor}")

    @classmethod
    def from_args(cls, name, values, text):  # its own words: the factor is optional
        if len(values) > 2:
            raise ValueError(f"{text!r}: write headkv_<floor> or headkv_<floor>_<factor>, e.g. headkv_0.2_4")
        return cls(*values)

    @property
    def name(self) -> str:
        return f"headkv_{self.floor:g}" + ("" if self.factor == self.DEFAULT_FACTOR else f"_{self.factor:g}")

    def sizes(self, rule: Policy) -> tuple[int, int]:
        """(floor, cap): the fewest and the most tokens any head holds."""
        floor = min(rule.budget, max(rule.sinks + rule.recent, math.ceil(self.floor * rule.budget)))
        return floor, max(rule.budget, int(self.factor * rule.budget))

    def budgets(self, rule: Policy, table: torch.Tensor) -> torch.Tensor:
        """[layers, heads] tokens per head: the floor + a share of the pool proportional to the head's score,
        water-filled under the cap; they add up to exactly heads x budget (`water_fill`)."""
        floor, cap = self.sizes(rule)
        weights = table.to(torch.float64).flatten().tolist()
        out = water_fill(weights, table.numel() * rule.budget, floor, cap)
        return torch.tensor(out, dtype=torch.int64).view(table.shape)

    def plan(self, rule, layers, heads, scores=None):
        if scores is None:
            raise ValueError(f"{self.name}: needs head scores ('retrieval'): pass head_scores=h2o.head_scores(model, "
                             "...) to h2o.make_cache")
        tables = head_tables(scores)
        if "retrieval" not in tables:
            raise ValueError(f"{self.name}: shares the budget by the 'retrieval' score, and the head scores given have "
                             f"only {', '.join(sorted(tables)) or 'none'}")
        table = tables["retrieval"]
        if tuple(table.shape) != (layers, heads):
            raise ValueError(f"{self.name}: head scores of shape {tuple(table.shape)} do not fit this model "
                             f"({layers} layers x {heads} KV heads)")
        budgets = self.budgets(rule, table).tolist()
        out = []
        for row in budgets:
            sizes = sorted(set(row), reverse=True)
            out.append(LayerPlan(tuple((tuple(h for h in range(heads) if row[h] == b), b) for b in sizes)))
        return out
