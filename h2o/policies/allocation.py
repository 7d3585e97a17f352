"""Allocations: how a cache's KV budget is shared among layers and KV heads. A rule still only ranks.

    <allocation>+<rule>     e.g. adakv+h2o_4_32_256, retrieval_0.1_4+h2o_4_32_256, pyramid_20+tova_4_32_256

<rule>'s budget is the AVERAGE budget per KV head: an allocation never holds more KV slots than <rule>
uniform (every head at <rule>'s budget), only shares them differently. Each head keeps its sinks and recent
window (the rule's, clamped to its own budget) and ranks the rest by the rule, within its own budget.

- ``retrieval_<share>_<factor>`` and ``induction_<share>_<factor>`` (retrieval heads, RazorAttention /
  DuoAttention without training): the top <share> of the model's KV heads by a head score
  (`h2o.head_scores`: "retrieval" from calibration needles, "induction" on repeated random tokens, or
  ``ablation_<share>_<factor>``: "ablation", the answer's loss when the head keeps only sinks and recent) hold up
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

A bare allocation name takes its defaults (`DEFAULTS`): adakv = adakv_0.2, global = global_0.2, headkv = headkv_0.2
(factor 4: headkv_0.2_4 is named headkv_0.2), pyramid = pyramid_20, retrieval = retrieval_0.1_4, induction =
induction_0.1_4.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Policy


@dataclass(frozen=True)
class LayerPlan:
    """One layer's head groups: (KV heads, budget per head) each; `joint`: the split is redone at every
    eviction, with the layer's `total` budget and a per-head `floor` (Ada-KV)."""

    groups: tuple[tuple[tuple[int, ...], int], ...]
    joint: bool = False
    total: int = 0
    floor: int = 0

    @property
    def uniform(self) -> bool:
        return len(self.groups) == 1 and not self.joint


class Allocation:
    """Base of the allocations: `NAME`, `plan(rule, layers, heads, scores)` -> one `LayerPlan` per layer."""

    NAME: ClassVar[str]
    score: ClassVar[str | None] = None  # the head score it needs (`h2o.head_scores`), if any
    across_layers: ClassVar[bool] = False  # one budget shared by every layer: the cache evicts them all together

    @property
    def name(self) -> str:
        raise NotImplementedError

    def plan(self, rule: Policy, layers: int, heads: int, scores=None) -> list[LayerPlan]:
        raise NotImplementedError


@dataclass(frozen=True)
class HeadShare(Allocation):
    """The top `share` of KV heads by head score `score` hold up to `factor` x budget; the rest share what is left."""

    NAME = "retrieval"
    score_name: str = "retrieval"
    share: float = 0.1
    factor: float = 4.0

    def __post_init__(self):
        if not 0 < self.share < 1:
            raise ValueError(f"{self.score_name}_<share>_<factor>: share must lie in (0, 1), got {self.share}")
        if not self.factor > 1:
            raise ValueError(f"{self.score_name}_<share>_<factor>: factor must be > 1, got {self.factor}")

    @property
    def score(self) -> str:
        return self.score_name

    @property
    def name(self) -> str:
        return f"{self.score_name}_{self.share:g}_{self.factor:g}"

    def sizes(self, rule: Policy, n_heads: int) -> tuple[int, int, int]:
        """(retrieval heads, their cap, every other head's budget) for a model of `n_heads` KV heads in all."""
        budget = rule.budget
        n = max(1, round(self.share * n_heads))
        if n >= n_heads:
            raise ValueError(f"{self.name}+{rule.name}: a share of {self.share:g} of this model's {n_heads} KV heads rounds "
                             f"to {n}, every head, leaving none to hold less: lower the share")
        cap = int(self.factor * budget)
        rest = (n_heads * budget - n * cap) // (n_heads - n)
        if rest <= rule.sinks:
            raise ValueError(f"{self.name}+{rule.name}: {n} of {n_heads} heads at {cap} tokens leave {rest} tokens to "
                             f"each other head, not more than its {rule.sinks} sinks: lower the share or the factor, "
                             "or raise the budget")
        return n, cap, rest

    def plan(self, rule, layers, heads, scores=None):
        if scores is None:
            raise ValueError(f"{self.name}: needs head scores ('{self.score_name}'): pass "
                             "head_scores=h2o.head_scores(model, ...) to h2o.make_cache")
        tables = head_tables(scores)
        if self.score_name not in tables:
            raise ValueError(f"{self.name}: ranks heads by the '{self.score_name}' score, and the head scores given have "
                             f"only {', '.join(sorted(tables)) or 'none'} (a model without a tokenizer has no retrieval "
                             "score: use induction_<share>_<factor>)")
        table = tables[self.score_name]
        if tuple(table.shape) != (layers, heads):
            raise ValueError(f"{self.name}: head scores of shape {tuple(table.shape)} do not fit this model "
                             f"({layers} layers x {heads} KV heads)")
        n, cap, rest = self.sizes(rule, layers * heads)
        order = torch.argsort(table.flatten().to(torch.float64), descending=True, stable=True)
        chosen = {divmod(int(i), heads) for i in order[:n]}
        out = []
        for layer in range(layers):
            top = tuple(h for h in range(heads) if (layer, h) in chosen)
            other = tuple(h for h in range(heads) if (layer, h) not in chosen)
            out.append(LayerPlan(tuple(g for g in ((top, cap), (other, rest)) if g[0])))
        return out


@dataclass(frozen=True)
class AdaKV(Allocation):
    """Ada-KV: a layer's budget split across its heads at every eviction, with a floor per head."""

    NAME = "adakv"
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


@dataclass(frozen=True)
class HeadKV(Allocation):
    """HeadKV: a floor and a cap per head; the rest of the cache's budget water-filled in proportion to each head's
    retrieval score."""

    NAME = "headkv"
    score: ClassVar[str] = "retrieval"
    floor: float = 0.2
    factor: float = 4.0  # the cap: factor x budget tokens a head

    DEFAULT_FACTOR: ClassVar[float] = 4.0

    def __post_init__(self):
        if not 0 <= self.floor <= 1:
            raise ValueError(f"headkv_<floor>: floor must lie in [0, 1], got {self.floor}")
        if not (math.isfinite(self.factor) and self.factor >= 1):
            raise ValueError(f"headkv_<floor>_<factor>: factor must be a number >= 1, got {self.factor}")

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


@dataclass(frozen=True)
class Global(Allocation):
    """One budget for the whole cache: every layer's and KV head's slots ranked together, a floor per head."""

    NAME = "global"
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


@dataclass(frozen=True)
class Pyramid(Allocation):
    """PyramidKV: budgets fall linearly with depth, mean at most the budget."""

    NAME = "pyramid"
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


DEFAULTS = {"retrieval": HeadShare("retrieval"), "induction": HeadShare("induction"),
            "ablation": HeadShare("ablation"), "adakv": AdaKV(),
            "global": Global(), "headkv": HeadKV(), "pyramid": Pyramid()}
_NAME = re.compile(r"(retrieval|induction|ablation|adakv|global|headkv|pyramid)((?:_[0-9.]+)*)")


def water_fill(weights, total: int, low: int, high: int) -> list[int]:
    """Whole-token budgets, one per weight, each within [low, high], adding up to exactly `total`: every head holds
    `low`, and the pool (total - n x low) is shared in proportion to the weights; a head whose share would take it
    past `high` holds `high`, and what it cannot hold is shared again among the others in proportion to their
    weights, until no share is over (heads of weight 0 share equally what the weighted heads cannot hold, and
    everything when no weight is positive). The real shares are then rounded down and the tokens left over go one
    each to the largest remainders (ties: the higher weight, then the earlier head)."""
    n = len(weights)
    if n == 0 or not n * low <= total <= n * high or low > high:
        raise ValueError(f"water_fill: {n} heads of {low}..{high} tokens cannot hold {total} in all")
    if any(not (math.isfinite(w) and w >= 0) for w in weights):
        raise ValueError("water_fill: weights must be finite and >= 0")
    room = high - low
    extra = [0.0] * n
    free = list(range(n))
    left = float(total - n * low)
    while free and left > 0:
        weighted = [i for i in free if weights[i] > 0]
        if weighted:
            mass = math.fsum(weights[i] for i in weighted)
            share = {i: left * (weights[i] / mass) for i in weighted}  # exact for subnormal weights too
        else:
            share = {i: left / len(free) for i in free}
        full = {i for i, x in share.items() if x >= room}
        if not full:
            for i, x in share.items():
                extra[i] = x
            break
        for i in full:
            extra[i] = float(room)
        left -= room * len(full)
        free = [i for i in free if i not in full]
    out = [low + min(room, math.floor(x)) for x in extra]
    short = total - sum(out)
    order = sorted(range(n), key=lambda i: (-(extra[i] - math.floor(extra[i])), -weights[i], i))
    while short > 0:  # one pass in exact arithmetic; more only to absorb floating-point error
        for i in order:
            if short and out[i] < high:
                out[i] += 1
                short -= 1
    for i in reversed(order):  # (floating-point error the other way: never expected)
        while short < 0 and out[i] > low:
            out[i] -= 1
            short += 1
    return out


def context_budgets(budgets: list[int], seen: int) -> list[int]:
    """A fixed plan's head budgets (one per KV head, every layer's) on a context of `seen` tokens: a head cannot hold
    more tokens than it has seen, so while the context is shorter than the largest budget, what a head cannot hold
    goes to the others in proportion to their planned budgets (`water_fill`, every head capped at `seen`), and the
    heads hold as many tokens in all as the plan (as the uniform rule of the same mean budget): every head all it has
    seen while that is within the plan's total, and from the largest budget on the plan itself. A head never gets
    less than min(its budget, seen)."""
    if seen >= max(budgets):
        return list(budgets)
    if seen * len(budgets) <= sum(budgets):
        return [seen] * len(budgets)
    return water_fill(budgets, sum(budgets), 0, seen)


def head_tables(scores) -> dict[str, torch.Tensor]:
    """Head scores as the allocations read them, {name: float32 [layers, KV heads] on the CPU}, from a
    `h2o.HeadScores` or a mapping of name -> table (a tensor, a numpy array or nested lists of real numbers): every
    table 2-D, non-empty, of one shape, finite and within [0, 1]. Anything else is a clear error; the caller's
    objects are not changed."""
    tables = getattr(scores, "scores", scores)
    if not isinstance(tables, Mapping):
        raise TypeError(f"head scores must be h2o.HeadScores or a dict of name -> [layers, KV heads] table, got "
                        f"{type(scores).__name__}")
    if not tables:
        raise ValueError("head scores hold no score")
    out = {}
    for name, table in tables.items():
        if not isinstance(name, str):
            raise TypeError(f"a head score's name must be a str, got {name!r}")
        out[name] = head_table(name, table)
    shapes = sorted({tuple(t.shape) for t in out.values()})
    if len(shapes) > 1:
        raise ValueError(f"head scores of different shapes: {shapes}")
    return out


def head_table(name: str, table) -> torch.Tensor:
    """One head score's table as float32 [layers, KV heads] (see `head_tables`)."""
    try:
        t = table.detach() if isinstance(table, torch.Tensor) else torch.as_tensor(table)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"head score {name!r} must be a [layers, KV heads] table of real numbers, got "
                        f"{type(table).__name__} ({e})") from None
    if t.dtype == torch.bool or t.is_complex() or not (t.is_floating_point() or t.dtype in _INTEGERS):
        raise TypeError(f"head score {name!r} must hold real numbers, got dtype {t.dtype}")
    if t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"head score {name!r} must be [num_layers, num_kv_heads], got shape {tuple(t.shape)}")
    t = t.to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"head score {name!r} has values that are not finite (NaN or inf)")
    if not bool(((t >= 0) & (t <= 1)).all()):
        raise ValueError(f"head score {name!r} has values outside [0, 1]")
    return t.to(torch.float32)


_INTEGERS = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def parse_allocation(text: str) -> Allocation | None:
    """The allocation `text` spells (a bare name takes its defaults), or None if it names none."""
    m = _NAME.fullmatch(text)
    if not m:
        return None
    kind, args = m[1], [a for a in m[2].split("_") if a]
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bad allocation {text!r}: its parameters must be numbers") from None
    if not values:
        return DEFAULTS[kind]
    if kind in ("retrieval", "induction", "ablation"):
        if len(values) != 2:
            raise ValueError(f"{text!r}: write {kind}_<share>_<factor>, e.g. {kind}_0.1_4")
        return HeadShare(kind, *values)
    if kind == "headkv":
        if len(values) > 2:
            raise ValueError(f"{text!r}: write headkv_<floor> or headkv_<floor>_<factor>, e.g. headkv_0.2_4")
        return HeadKV(*values)
    if len(values) != 1:
        raise ValueError(f"{text!r}: write {kind}_<{'beta' if kind == 'pyramid' else 'floor'}>")
    return {"adakv": AdaKV, "global": Global, "headkv": HeadKV, "pyramid": Pyramid}[kind](values[0])


def split(prefixed: str) -> tuple[str, str] | None:
    """("<allocation>", "<rule>") of a name "<allocation>+<rule>", or None if it does not start with one."""
    head, plus, rest = prefixed.partition("+")
    return (head, rest) if plus and _NAME.fullmatch(head) else None


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
