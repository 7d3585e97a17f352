"""Allocations: how a cache's KV budget is shared among layers and KV heads. A rule still only ranks.

    <allocation>+<rule>     e.g. adakv+h2o_4_32_256, retrieval_0.1_4+h2o_4_32_256, pyramid_20+tova_4_32_256

<rule>'s budget is the AVERAGE budget per KV head: an allocation never holds more KV slots than <rule>
uniform (every head at <rule>'s budget), only shares them differently. Each head keeps its sinks and recent
window (the rule's, clamped to its own budget) and ranks the rest by the rule, within its own budget.

- ``retrieval_<share>_<factor>`` and ``induction_<share>_<factor>`` (retrieval heads, RazorAttention /
  DuoAttention without training): the top <share> of the model's KV heads by a head score
  (`h2o.head_scores`: "retrieval" from calibration needles, "induction" on repeated random tokens, or
  ``ablation_<share>_<factor>``: "ablation", the answer's loss when the head keeps only sinks and recent;
  ``reconstruction_<share>_<factor>``: "reconstruction", KVzip's context-independent head score, how much of the
  context the model reads when it repeats calibration text) hold up
  to <factor> x budget tokens (the whole context when that is longer than the prompt); every other head holds
  floor((N x budget - n x cap) / (N - n)) (N heads in all, n of them retrieval heads).
- ``adakv_<floor>`` (Ada-KV): at each eviction a layer's budget (its heads x budget) is split across its KV
  heads by one top-k over the rule's priorities of all its heads' slots together (`h2o.policies.base.priorities`);
  each head keeps at least max(sinks + recent, ceil(<floor> x budget)) tokens.
- ``global_<floor>`` (one budget for the whole cache): the cache's budget (layers x heads x budget) is split
  across every layer's KV heads together, after every forward that takes the cache past it (the cache evicts all
  its layers together, `h2o.shared_budget`), by one top-k over the rule's priorities of all their slots; each head
  keeps at least max(sinks + recent, ceil(<floor> x budget)) tokens. The rule's priorities must be comparable
  across layers (attention mass and its averages are; a rule whose scale differs by layer ranks layers too).
- ``headkv_<floor>`` or ``headkv_<floor>_<factor>`` (HeadKV): every KV head keeps max(sinks + recent,
  ceil(<floor> x budget)) tokens and at most <factor> x budget (default 4, as retrieval heads: a head cannot use
  more than the prompt, and a plan that does not know the prompt's length must not give it more); the rest of the
  cache's N x budget is water-filled among the heads in proportion to their retrieval score: what a head's share
  would put above its cap goes to the other heads, by score, until none is over (heads of score 0 share equally
  what the scored heads cannot hold; equal shares where every score is 0), then rounded to whole tokens by largest
  remainders. The budgets add up to exactly N x budget (`water_fill`).
- ``pyramid_<beta>`` (PyramidKV): layer budgets fall linearly with depth from 2 x budget - b_min at the first
  layer to b_min = max(budget // <beta>, sinks + recent + 1) at the last (rounded down: the mean is at most the
  budget); every head of a layer holds its layer's budget.

Each allocation is one class in a module of its own (`h2o.policies.allocations`), registered with
`register_allocation` as a rule is with `register_policy`: its name, grammar, example and one line of help come from
the class, and `parse_allocation`, the README's table (`allocation_table`) and the property tests read the registry;
an allocation of your own registers the same way from outside the package. A bare allocation name takes its defaults
(`DEFAULTS`): adakv = adakv_0.2, global = global_0.2, headkv = headkv_0.2
(factor 4: headkv_0.2_4 is named headkv_0.2), pyramid = pyramid_20, retrieval = retrieval_0.1_4, induction =
induction_0.1_4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Policy
from .allocations.plan import (  # noqa: F401 (the allocations' common ground, importable from here as before)
    DEFAULTS, Allocation, LayerPlan, allocation_names, allocation_table, context_budgets, head_table, head_tables,
    parse_allocation, register_allocation, registered_allocations, split, water_fill)


@dataclass(frozen=True)
class Allocated:
    """A rule under an allocation: what `h2o.parse("adakv+h2o_4_32_256")` gives. Sized like the rule (its
    `budget` is the average per KV head); the cache asks `plan` for each layer's head groups."""

    allocation: Allocation
    rule: Policy

    evicts: ClassVar[bool] = True
    has_score: ClassVar[bool] = False

    def __post_init__(self):
        if not getattr(self.rule, "evicts", False) or isinstance(self.rule, Allocated):
            raise ValueError(f"an allocation needs an evicting rule to rank within each head, got {self.rule!r}")

    @property
    def name(self) -> str:
        return f"{self.allocation.name}+{self.rule.name}"

    @property
    def budget(self) -> int:
        return self.rule.budget

    @property
    def sinks(self) -> int:
        return self.rule.sinks

    @property
    def recent(self) -> int:
        return self.rule.recent

    @property
    def observes(self):
        return self.rule.observes

    @property
    def replays(self) -> bool:
        return self.rule.replays

    @property
    def across_layers(self) -> bool:
        return self.allocation.across_layers

    @property
    def state(self):
        return self.rule.state

    def plan(self, layers: int, heads: int, scores=None) -> list[LayerPlan]:
        return self.allocation.plan(self.rule, layers, heads, scores)


def split_budget(ranks: list[torch.Tensor], total: int, floor: int) -> torch.Tensor:
    """Ada-KV's split of one layer's `total` kept slots across its heads: counts [B, H] (int64).

    ranks: per head h, [B, 1, L_h] float32 priorities (`priorities`: +inf always kept, -inf no real token).
    Every head keeps its `floor` best slots (or all its real ones); the rest of `total` goes to the best slots of
    all heads together. A row with fewer real slots than `total` keeps them all."""
    if total < len(ranks) * floor:
        raise ValueError(f"split_budget: a total of {total} cannot give {len(ranks)} heads a floor of {floor} each")
    b = ranks[0].shape[0]
    width = max(r.shape[-1] for r in ranks)
    padded = torch.full((b, len(ranks), width), -torch.inf, device=ranks[0].device)
    for h, r in enumerate(ranks):
        padded[:, h, :r.shape[-1]] = r[:, 0]
    real = padded > -torch.inf
    if floor > 0:
        best = padded.topk(min(floor, width), dim=-1).indices
        padded.scatter_(-1, best, torch.inf)
        padded.masked_fill_(~real, -torch.inf)  # a head with fewer real slots than the floor
    chosen = padded.view(b, -1).topk(min(total, padded[0].numel()), dim=-1).indices
    hit = real.view(b, -1).gather(-1, chosen).to(torch.int64)
    counts = torch.zeros(b, len(ranks), dtype=torch.int64, device=padded.device)
    return counts.scatter_add_(1, chosen // width, hit)


# The built-in allocations, registered in this order (each in its module of h2o.policies.allocations).
from .allocations.retrieval_heads import HeadShare  # noqa: E402
from .allocations.adakv import AdaKV  # noqa: E402
from .allocations.global_budget import Global  # noqa: E402
from .allocations.headkv import HeadKV  # noqa: E402
from .allocations.pyramid import Pyramid  # noqa: E402

__all__ = ["LayerPlan", "Allocation", "Allocated", "register_allocation", "registered_allocations", "allocation_names",
           "parse_allocation", "split", "DEFAULTS", "allocation_table", "water_fill", "context_budgets", "head_tables", "head_table",
           "split_budget", "HeadShare", "AdaKV", "Global", "HeadKV", "Pyramid"]
