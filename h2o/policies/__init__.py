"""Eviction policies: one module per rule, all through one registry.

    import h2o
    h2o.parse("h2o_4_32_256")        # H2O(sinks=4, recent=32, budget=256, score="mean")
    h2o.policy_names()               # {grammar: example} of every registered rule

    @h2o.register_policy             # a user's rule: see the README for a complete one
    @dataclass(frozen=True)
    class MyRule(h2o.Policy): ...

What a policy observes, keeps and decides, and when, is the contract written in
`h2o.policies.base`. `keep_indices` is the one pure function every rule is ranked through.
"""

from __future__ import annotations

import dataclasses
import re

from .. import names as _names
from . import allocation
from .allocation import Allocated, parse_allocation
from .base import OBSERVATIONS, Observation, Policy, check_sizes, keep_indices, priorities

_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy class parseable by name in every h2o entry point."""
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise TypeError(f"register_policy takes a subclass of h2o.Policy, got {cls!r}")
    for attr in ("NAME", "GRAMMAR", "EXAMPLE"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            raise TypeError(f"{cls.__name__} must define the class attribute {attr} (a non-empty str)")
    if cls.NAME in _REGISTRY:
        raise ValueError(f"a policy named {cls.NAME!r} is already registered ({_REGISTRY[cls.NAME].__name__})")
    if cls.NAME in allocation.registered_allocations():
        raise ValueError(f"{cls.NAME!r} is the name of an allocation: a rule needs another name")
    unknown = set(cls.observes) - set(OBSERVATIONS)
    if unknown:
        raise ValueError(f"{cls.__name__} observes {sorted(unknown)}; what attention can give: {OBSERVATIONS}")
    example = cls.from_name(cls.EXAMPLE)
    if not isinstance(example, cls) or example.name != cls.from_name(example.name).name:
        raise ValueError(f"{cls.__name__}.EXAMPLE {cls.EXAMPLE!r} does not parse back to a {cls.__name__}")
    _REGISTRY[cls.NAME] = cls
    return cls


def registered() -> dict[str, type[Policy]]:
    """{NAME: class} of every registered policy, in registration order."""
    return dict(_REGISTRY)


def policy_names() -> dict[str, str]:
    """{grammar: example name that parses} of every registered policy."""
    return {cls.GRAMMAR: cls.EXAMPLE for cls in _REGISTRY.values()}


def decode_rules() -> list[str]:
    """The rules `snapkv_..+<rule>` and `kvzip_..+<rule>` hand decoding to: every evicting rule that ranks tokens as
    they come (not one that replays, nor one that needs a fitted surrogate, nor SnapKV or StreamingLLM)."""
    return [n for n, c in _REGISTRY.items() if c.evicts and not c.replays and not getattr(c, "needs_surrogate", False)
            and n not in ("snapkv", "streaming")]


def families() -> list[str]:
    """Rule families for sweeps: every registered evicting rule's NAME, and NAME_<rule> for each scoring rule
    of the rules that have one (h2o_mean, h2o_sum, ...)."""
    from .h2o import SCORE_RULES
    out = []
    for name, cls in _REGISTRY.items():
        if cls.evicts:
            out += [name] + ([f"{name}_{rule}" for rule in SCORE_RULES] if cls.has_score else [])
            out += [f"{name}_{variant}" for variant in getattr(cls, "FAMILY_VARIANTS", ())]
    return out + ["recommended"]


def is_family(name: str) -> bool:
    """A rule family (`families()`), or one under an allocation: "<allocation>+<family>" (adakv+h2o_mean)."""
    parts = allocation.split(name)
    return (parts[1] if parts else name) in families()


def at_budget(family: str, budget: int, score: str | None = None, recent: int | None = None) -> Policy:
    """The family's policy at `budget` tokens: 4 sinks, a recent window of `recent` tokens (default budget / 8;
    StreamingLLM: the rest is its window); `score` is the scoring rule of a family that does not name one.
    "recommended" is `h2o.recommended(budget)`, whose recent window is its own. "<allocation>+<family>" is the
    family's policy under that allocation, `budget` the average per KV head."""
    parts = allocation.split(family)
    if not is_family(family):  # the whole name in the message, "did you mean" included (h2o.names)
        raise ValueError(_names.unknown_family(family, families(), allocation.DEFAULTS, splits=parts is not None))
    if parts:
        return allocation.Allocated(allocation.parse_allocation(parts[0]), at_budget(parts[1], budget, score, recent))
    if family == "recommended":
        return recommended(budget)
    name, _, rule = family.partition("_")
    cls = _REGISTRY[name]
    policy = cls.sized(4, budget // 8 if recent is None else recent, budget)
    if rule in getattr(cls, "FAMILY_VARIANTS", ()):  # kvzap_mlp: the name's own suffix
        return cls.from_name(f"{policy.name}_{rule}")
    if cls.has_score and (rule or score):
        policy = dataclasses.replace(policy, score=rule or score)
    return policy


def _spells(policy: Policy) -> bool:
    try:
        return parse(policy.name) == policy
    except (ValueError, TypeError):
        return False


def parse(spec: str | Policy, score: str | None = None) -> Policy:
    """The policy a name spells (or the object itself, checked); `score` sets H2O's scoring rule.

    `score` is an error for a rule without one, and for a name or object that already names another.
    """
    if isinstance(spec, allocation.Allocated):
        parse(spec.rule, score)
        return spec
    if isinstance(spec, str) and (parts := allocation.split(spec)):
        return allocation.Allocated(allocation.parse_allocation(parts[0]), parse(parts[1], score))
    if isinstance(spec, Policy):
        policy = spec
        registered = _REGISTRY.get(type(policy).NAME)
        # a registered rule's own variant (snapkv_..+tova is a SnapKVThen) is accepted where its name spells it back
        if registered is not type(policy) and not (registered is not None and isinstance(policy, registered)
                                                   and _spells(policy)):
            raise ValueError(f"{type(policy).__name__} is not a registered policy; decorate it with "
                             "@h2o.register_policy")
        if score is not None and type(policy).has_score and policy.score != score:
            raise ValueError(f"policy {policy.name!r} has score rule {policy.score!r} but score={score!r} was given")
    elif not isinstance(spec, str):
        raise TypeError(f"policy must be a name or a policy object, got {type(spec).__name__}")
    elif m := re.fullmatch(_names.RECOMMENDED_PATTERN, spec):
        if score is not None:
            raise ValueError(f"{spec!r} is the recommended policy with its own rule; score={score!r} does not apply")
        return recommended(int(m[1]))
    else:
        policy = None
        for cls in _REGISTRY.values():
            policy = cls.from_name(spec, score if cls.has_score else None)
            if policy is not None:
                break
        if policy is None:
            raise ValueError(unknown_policy(spec))
    if score is not None and not type(policy).has_score:
        raise ValueError(f"score={score!r} only applies to H2O and the other rules with a scoring rule "
                         f"({', '.join(n for n, c in _REGISTRY.items() if c.has_score)}), not {policy.name!r}")
    return policy


def unknown_policy(spec: str) -> str:
    """Why `spec` names no policy, and what to write instead: the grammar of the rule it starts with, or the names
    it is closest to ("did you mean"), never the whole grammar (`h2o.names.unknown_policy`, whose words the `h2o`
    command also says before torch is imported)."""
    return _names.unknown_policy(spec, policy_names(), allocation.DEFAULTS, splits=allocation.split(spec) is not None)


def resolve(names: list[str], score: str | None = None) -> list[str]:
    """Canonical names (the scoring rule spelled out); `score` applies to the names of rules that have one."""
    return [parse(n, score if score is not None and _has_score(parse(n)) else None).name for n in names]


def _has_score(policy) -> bool:
    return type(policy.rule if isinstance(policy, allocation.Allocated) else policy).has_score


# The built-in rules, registered in this order (parse tries them in turn).
from .full import Full  # noqa: E402
from .streaming import Streaming  # noqa: E402
from .h2o import DEFAULT_SCORE, H2O, SCORE_RULES  # noqa: E402
from .tova import TOVA  # noqa: E402
from .a2sf import A2SF  # noqa: E402
from .vatp import VATP  # noqa: E402
from .knorm import KNorm  # noqa: E402
from .keydiff import KeyDiff  # noqa: E402
from .snapkv import SnapKV  # noqa: E402
from .caote import CAOTE  # noqa: E402
from .vlen import VLen  # noqa: E402
from .kvzip import KVzip  # noqa: E402
from .kvzap import KVzap  # noqa: E402
from .recommendation import recommended  # noqa: E402

__all__ = ["Policy", "Observation", "OBSERVATIONS", "register_policy", "registered", "policy_names", "parse",
           "families", "at_budget",
           "resolve", "keep_indices", "priorities", "Allocated", "parse_allocation", "is_family", "check_sizes", "Full", "Streaming", "H2O", "TOVA", "A2SF", "VATP", "KNorm", "KeyDiff", "SnapKV", "CAOTE", "VLen", "KVzip", "KVzap", "recommended",
           "DEFAULT_SCORE", "SCORE_RULES"]
