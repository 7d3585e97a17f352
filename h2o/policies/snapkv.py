"""SnapKV (Li et al., 2024): keep the prompt keys that the last `window` prompt queries attend to.

Question-aware prefill compression: in a prompt that ends with the question, the last queries already
look at what the answer needs. A key's score is the attention it received from the last `window`
queries of each forward (summed over the group's query heads), and it is ranked by that score
average-pooled over neighbouring slots (kernel 5, as kvpress), so a needle's neighbours stay with it.
After the prompt, every new query has weight 1, so the tokens that follow are ranked by the attention
they accumulate (H2O's sum rule): SnapKV for the prompt composed with H2O for decoding. The window must
fit in the budget.

`snapkv_<s>_<r>_<b>_<w>+<rule>` composes SnapKV with any other decode-time rule (`SnapKVThen`): SnapKV ranks
at every forward of several tokens (the prompt, or a chunk of it); from the first one-token forward on, every
slot is ranked by `<rule>` at the same sizes, its state kept from the tokens' arrival and updated by the
one-token forwards only (as kvpress's PrefillDecodingPress composes a prefill and a decoding press). `<rule>`
is a registered rule's name and what its grammar spells after the sizes: `+tova`, `+h2o_mean`, `+a2sf_0.9`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import register_policy
from .base import Sized

DEFAULT_WINDOW = 16
KERNEL = 5


@register_policy
@dataclass(frozen=True)
class SnapKV(Sized):
    NAME = "snapkv"
    GRAMMAR = "snapkv_<sinks>_<recent>_<budget>_<window>[+<rule>]"
    EXAMPLE = "snapkv_4_32_256_16"
    PATTERN = Sized.PATTERN + r"_(?P<window>\d+)(?:\+(?P<then>[a-z0-9]+)(?P<rest>.*))?"
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
        m = cls.match(name)
        if not m:
            return None
        sizes = int(m["sinks"]), int(m["recent"]), int(m["budget"]), int(m["window"])
        if m["then"] is None:
            return cls(*sizes)
        from . import decode_rules, parse

        rules = decode_rules()
        if m["then"] not in rules:
            raise ValueError(f"{name}: after '+' name a decode-time rule that ranks tokens ({', '.join(rules)}), "
                             "e.g. snapkv_4_32_256_16+tova")
        return SnapKVThen(*sizes, then=parse(f"{m['then']}_{m['sinks']}_{m['recent']}_{m['budget']}{m['rest']}"))

    @classmethod
    def sized(cls, sinks, recent, budget):
        return cls(sinks, recent, budget, min(DEFAULT_WINDOW, budget))

    def with_budget(self, budget):
        return dataclasses.replace(self, budget=budget, recent=min(self.recent, budget - self.sinks),
                                   window=min(self.window, budget))

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


@dataclass(frozen=True)
class SnapKVThen(SnapKV):
    """SnapKV for the forwards of several tokens, then `then` (a decode-time rule at the same sizes) for every
    slot from the first one-token forward on. Its state: SnapKV's "score", a "decoding" flag per slot (1 once a
    one-token forward observed it) and `then`'s state as "then.<name>"."""

    then: object = None

    def __post_init__(self):
        super().__post_init__()
        t = self.then
        if not getattr(t, "evicts", False) or (t.sinks, t.recent, t.budget) != (self.sinks, self.recent, self.budget):
            raise ValueError(f"snapkv+rule: the decode rule must evict at the same sizes, got {t!r}")

    def with_budget(self, budget):
        return dataclasses.replace(self, budget=budget, recent=min(self.recent, budget - self.sinks),
                                   window=min(self.window, budget), then=self.then.with_budget(budget))

    @property
    def observes(self):
        return frozenset({"mass"}) | self.then.observes

    @property
    def state(self):
        return ("score", "decoding", *(f"then.{n}" for n in self.then.state))

    @property
    def name(self) -> str:
        t = self.then
        return f"{super().name}+{t.NAME}{t.name[len(f'{t.NAME}_{t.sinks}_{t.recent}_{t.budget}'):]}"

    def _then_state(self, state):
        return {n: state[f"then.{n}"] for n in self.then.state}

    def initial_state(self, keys, values):
        b, h, q, _ = keys.shape
        zeros = lambda: torch.zeros(b, h, q, dtype=torch.float32, device=keys.device)  # noqa: E731
        then = self.then.initial_state(keys, values)
        return {"score": zeros(), "decoding": zeros(), **{f"then.{n}": then[n] for n in self.then.state}}

    def update(self, state, obs, seen):
        if obs.queries > 1:  # the prompt (or a chunk of it): SnapKV's window mass
            state["score"] += obs.mass
        else:
            self.then.update(self._then_state(state), obs, seen)
            state["decoding"].fill_(1.0)

    def rank(self, state, times, seen, **slots):
        snap = super().rank(state, times, seen)
        then = self.then.rank(self._then_state(state), times, seen, **slots).to(torch.float32)
        return torch.where(state["decoding"] > 0, then, snap)
