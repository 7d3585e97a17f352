"""KVzip (Kim et al., 2025): score the context by how much the model needs each key to reconstruct it.

Compression before the question is known. After a forward of several tokens (a prompt, or a chunk of context fed
in the streaming protocol), the cache holds them until they are scored (`h2o.replay`): the model is fed, chunk
by chunk, an instruction to repeat the context, then the context itself, teacher-forced, over the cache. A key's
score is the largest attention probability any replay query of its KV head's group gives it, the softmax taken
over the sinks, the chunk being reconstructed and the replay's own keys (the paper's and kvpress's definition);
the replay's keys and values never stay. Then the cache evicts by those scores: per KV head at the rule's budget,
or, under ``global+kvzip_...``, one top-k over every layer and head (KVzip's default, `h2o.shared_budget`).

From the first one-token forward on, a slot's score also takes the newest query's attention (averaged over the
group) when it is larger: a token generated after the context is ranked on the same scale, by the most
attention it has received. ``kvzip_<s>_<r>_<b>+<rule>`` instead ranks every slot by ``<rule>`` (a decode-time
rule at the same sizes, its state updated by the one-token forwards only) from the first one-token forward on,
as `snapkv_..+<rule>` does.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import register_policy
from .base import Sized



@register_policy
@dataclass(frozen=True)
class KVzip(Sized):
    NAME = "kvzip"
    GRAMMAR = "kvzip_<sinks>_<recent>_<budget>[+<rule>]"
    EXAMPLE = "kvzip_4_32_256"
    PATTERN = Sized.PATTERN + r"(?:\+(?P<then>[a-z0-9]+)(?P<rest>.*))?"
    observes = frozenset({"replay", "last"})
    state = ("score",)
    replays = True

    @classmethod
    def from_name(cls, name, score=None):
        m = cls.match(name)
        if not m:
            return None
        sizes = int(m["sinks"]), int(m["recent"]), int(m["budget"])
        if m["then"] is None:
            return cls(*sizes)
        from . import decode_rules, parse

        rules = decode_rules()
        if m["then"] not in rules:
            raise ValueError(f"{name}: after '+' name a decode-time rule that ranks tokens ({', '.join(rules)}), "
                             "e.g. kvzip_4_32_256+tova")
        return KVzipThen(*sizes, then=parse(f"{m['then']}_{m['sinks']}_{m['recent']}_{m['budget']}{m['rest']}"))

    def update(self, state, obs, seen):
        if obs.replay is not None:  # a replay: the largest attention each key got from the reconstruction
            torch.maximum(state["score"], obs.replay, out=state["score"])
        elif obs.queries == 1:  # decoding: the newest query's attention, on the same scale
            torch.maximum(state["score"], obs.last, out=state["score"])
        # a forward of several tokens is scored by its replay, which follows it

    def rank(self, state, times, seen, **slots):
        return state["score"]


@dataclass(frozen=True)
class KVzipThen(KVzip):
    """KVzip for the context, then `then` (a decode-time rule at the same sizes) for every slot from the first
    one-token forward on. Its state: KVzip's "score", a "decoding" flag per slot and `then`'s state as "then.<name>"."""

    then: object = None

    def __post_init__(self):
        super().__post_init__()
        t = self.then
        if not getattr(t, "evicts", False) or (t.sinks, t.recent, t.budget) != (self.sinks, self.recent, self.budget):
            raise ValueError(f"kvzip+rule: the decode rule must evict at the same sizes, got {t!r}")

    def with_budget(self, budget):
        return dataclasses.replace(self, budget=budget, recent=min(self.recent, budget - self.sinks),
                                   then=self.then.with_budget(budget))

    @property
    def observes(self):
        return frozenset({"replay"}) | self.then.observes

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

    def query_weights(self, q, device):
        return self.then.query_weights(q, device)

    def update(self, state, obs, seen):
        if obs.replay is not None:
            torch.maximum(state["score"], obs.replay, out=state["score"])
        elif obs.queries == 1:
            self.then.update(self._then_state(state), obs, seen)
            state["decoding"].fill_(1.0)

    def rank(self, state, times, seen, **slots):
        then = self.then.rank(self._then_state(state), times, seen, **slots).to(torch.float32)
        return torch.where(state["decoding"] > 0, then, state["score"])
