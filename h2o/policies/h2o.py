"""H2O (Zhang et al., 2023): sinks + recent window + heavy hitters by the attention each key received.

Chosen per KV head (under GQA the mass is summed over the query heads of the group). Two rules:
- ``sum``: the attention each key received, summed over every query that saw it (the paper);
- ``mean``: that sum divided by the number of queries that saw the key (keys_values'
  `normalize_scores`), so old tokens do not win by age alone.
The default is ``mean``. Measured on the embedded SmolLM2-135M (README, `h2o sweep`,
benchmarks/test_ppl.py): "mean" beats StreamingLLM at budgets 128-256 on WikiText-2 and PG-19 and is
within 0.2% of it on PG-19 at 512, while "sum" loses to StreamingLLM on PG-19 at 128-512; "sum" is better
than "mean" on WikiText-2 at 256 and 512. No rule wins everywhere; the default is the one that does not
fall behind the simpler baseline where the budget is tight.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Sized

SCORE_RULES = ("mean", "sum")
DEFAULT_SCORE = "mean"


def scored_name(cls, name: str, score: str | None):
    """The policy '<NAME>_<s>_<r>_<b>[_<rule>]' spells, checking `score` against a spelled rule."""
    m = cls.match(name)
    if not m:
        return None
    if m["score"] and score and score != m["score"]:
        raise ValueError(f"policy {name!r} names score rule {m['score']!r} but score={score!r} was given")
    return cls(int(m["sinks"]), int(m["recent"]), int(m["budget"]), m["score"] or score or DEFAULT_SCORE)


def check_rule(policy) -> None:
    if policy.score not in SCORE_RULES:
        raise ValueError(f"unknown {type(policy).__name__} score rule {policy.score!r}; choose one of {SCORE_RULES}")


def scored(policy, mass, times, seen):
    """The rule applied to accumulated mass: the sum itself, or the mean over the queries that saw each key
    (the key at time t was seen by the queries t..seen-1: left padding only precedes a row's real tokens)."""
    if policy.score == "sum":
        return mass
    return mass / (seen - times).clamp_min(1).to(mass.dtype)


@register_policy
@dataclass(frozen=True)
class H2O(Sized):
    """`sinks` + `recent` + (`budget` - sinks - recent) heavy hitters, chosen per KV head."""

    NAME = "h2o"
    GRAMMAR = "h2o_<sinks>_<recent>_<budget>[_mean|_sum]"
    EXAMPLE = "h2o_4_32_256"
    PATTERN = Sized.PATTERN + r"(?:_(?P<score>\w+))?"  # any word: a wrong one gets check_rule's message
    observes = frozenset({"mass"})
    state = ("score",)
    has_score = True

    score: str = DEFAULT_SCORE

    def __post_init__(self):
        super().__post_init__()
        check_rule(self)

    @classmethod
    def from_name(cls, name, score=None):
        return scored_name(cls, name, score)

    @property
    def name(self) -> str:
        return f"{self.NAME}_{self.sinks}_{self.recent}_{self.budget}_{self.score}"

    def update(self, state, obs, seen):
        state["score"] += obs.mass

    def rank(self, state, times, seen, **slots):
        return scored(self, state["score"], times, seen)
