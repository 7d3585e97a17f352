"""The allocations' common ground: a layer's plan (`LayerPlan`), the base class (`Allocation`), the registry
(`register_allocation`, `parse_allocation`), and the arithmetic every plan shares (`water_fill`, `context_budgets`,
`head_tables`). Each allocation is a module beside this one; `h2o.policies.allocation` gathers them."""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..base import Policy


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
    """Base of the allocations, each one class in a module of its own (`h2o.policies.allocations`), registered with
    `register_allocation` as a rule is with `register_policy`:

    - `NAME` (or `NAMES`, for one class under several names: the retrieval, induction and ablation heads), `GRAMMAR`
      and `EXAMPLE` (with `{name}` where the name goes), `HELP` (one line: what it does);
    - `from_args(name, values, text)`: the allocation a name's numbers spell (`adakv_0.5` -> name "adakv", values
      [0.5]; none: its defaults), a clear error for a wrong count;
    - `name` (its canonical spelling) and `plan(rule, layers, heads, scores)` -> one `LayerPlan` per layer.
    """

    NAME: ClassVar[str]
    GRAMMAR: ClassVar[str]
    EXAMPLE: ClassVar[str]
    HELP: ClassVar[str]
    score: ClassVar[str | None] = None  # the head score it needs (`h2o.head_scores`), if any
    across_layers: ClassVar[bool] = False  # one budget shared by every layer: the cache evicts them all together

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(getattr(cls, "NAMES", (cls.NAME,)))

    @classmethod
    def grammar(cls, name: str) -> str:
        return cls.GRAMMAR.format(name=name)

    @classmethod
    def example(cls, name: str) -> str:
        return cls.EXAMPLE.format(name=name)

    @classmethod
    def from_args(cls, name: str, values: list[float], text: str) -> Allocation:
        """Default: the class's fields in order, as many as given (none: the defaults)."""
        fields = [f for f in dataclasses.fields(cls) if f.init]
        if len(values) > len(fields):
            raise ValueError(f"{text!r}: write {cls.grammar(name)}, e.g. {cls.example(name)}")
        return cls(*values)

    @property
    def name(self) -> str:
        raise NotImplementedError

    def plan(self, rule: Policy, layers: int, heads: int, scores=None) -> list[LayerPlan]:
        raise NotImplementedError


_ALLOCATIONS: dict[str, type[Allocation]] = {}  # name -> class, in registration order
DEFAULTS: dict[str, Allocation] = {}  # name -> the allocation a bare name takes
_NAME = re.compile(r"([a-z][a-z0-9]*)((?:_[0-9.]+)*)")


def register_allocation(cls: type[Allocation]) -> type[Allocation]:
    """Class decorator: make an allocation parseable as `<name>[_<number>...]+<rule>` in every h2o entry point (and
    so in the property tests, which draw every registered allocation)."""
    if not (isinstance(cls, type) and issubclass(cls, Allocation)):
        raise TypeError(f"register_allocation takes a subclass of h2o.policies.allocation.Allocation, got {cls!r}")
    for attr in ("GRAMMAR", "EXAMPLE", "HELP"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define the class attribute {attr} (a non-empty str)")
    names = cls.names()
    if not names or not all(isinstance(n, str) and re.fullmatch(r"[a-z][a-z0-9]*", n) for n in names):
        raise TypeError(f"{cls.__name__} must define NAME (or NAMES): lower-case letters and digits, e.g. 'adakv'")
    rules = getattr(sys.modules.get("h2o.policies"), "_REGISTRY", {})  # the rules' names: an allocation may not take one
    for n in names:
        if n in _ALLOCATIONS or n in rules:
            raise ValueError(f"an allocation or rule named {n!r} is already registered")
    for n in names:
        example = cls.example(n)
        try:
            parsed = _parse(example, {n: cls})
            ok = isinstance(parsed, cls) and _parse(parsed.name, {n: cls}) == parsed
        except ValueError as error:
            ok, parsed = False, error
        if not ok:
            raise ValueError(f"{cls.__name__}.EXAMPLE {example!r} does not parse back to a {cls.__name__} "
                             f"(got {parsed!r})")
    for n in names:
        _ALLOCATIONS[n] = cls
        DEFAULTS[n] = cls.from_args(n, [], n)
    return cls


def registered_allocations() -> dict[str, type[Allocation]]:
    """{name: class} of every registered allocation, in registration order."""
    return dict(_ALLOCATIONS)


def allocation_names() -> dict[str, tuple[str, str]]:
    """{name: (grammar, example)} of every registered allocation."""
    return {n: (cls.grammar(n), cls.example(n)) for n, cls in _ALLOCATIONS.items()}


def allocation_table(builtin_only: bool = True) -> str:
    """The allocations as a Markdown table (name, what it does, e.g.): the README's, generated from the registry (a
    test holds the README to it); `builtin_only`: those of the package, not a user's."""
    rows = ["| allocation | what it does | e.g. |", "|---|---|---|"]
    for n, cls in _ALLOCATIONS.items():
        if builtin_only and not cls.__module__.startswith("h2o."):
            continue
        said = re.sub(r"(<[a-z_]+>)", r"`\1`", cls.HELP.format(name=n))  # placeholders as code (else HTML tags)
        rows.append(f"| `{cls.grammar(n)}` | {said} | `{cls.example(n)}+h2o_4_32_256` |")
    return "\n".join(rows) + "\n"


def parse_allocation(text: str) -> Allocation | None:
    """The allocation `text` spells (a bare name takes its defaults), or None if it names none."""
    return _parse(text, _ALLOCATIONS)


def _parse(text: str, registry: dict) -> Allocation | None:
    m = _NAME.fullmatch(text)
    if not m or m[1] not in registry:
        return None
    kind, args = m[1], [a for a in m[2].split("_") if a]
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"bad allocation {text!r}: its parameters must be numbers") from None
    return registry[kind].from_args(kind, values, text)


def split(prefixed: str) -> tuple[str, str] | None:
    """("<allocation>", "<rule>") of a name "<allocation>+<rule>", or None if it does not start with one."""
    head, plus, rest = prefixed.partition("+")
    m = _NAME.fullmatch(head)
    return (head, rest) if plus and m and m[1] in _ALLOCATIONS else None


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
