"""What a policy is, what it may observe, and the one pure function that picks the kept slots.

The contract between attention, cache and policy, for one forward of one compressed layer:

1. `CompressedLayer.update(keys, values)` appends the new tokens to the layer's slots, with their
   arrival times, validity and the policy's initial per-slot state (`Policy.initial_state`), and
   hands the layer to the attention function. A layer updated again before its attention observed
   it raises: the previous forward never reached h2o's attention (the model was restored, another
   model or attention implementation was used), so it could not have evicted.
2. The attention function runs the model's attention over the kept slots with an exact mask and,
   in the same call, computes only what the policy's `observes` asks for, per row and KV head, in
   float32 (`Observation`):
   - ``mass``  [B, Hkv, L]: the attention each kept key received from the new queries, summed over
     those queries and over the query heads of its KV head (queries weighted by
     `Policy.query_weights` when the policy gives weights: a decayed sum);
   - ``last``  [B, Hkv, L]: the newest query's attention row, averaged over the group's query heads;
   - ``count`` [B, 1, L]: how many of the new real queries saw each key;
   - ``vmass`` [B, Hkv, L]: each key's share of each new query's value-weighted attention (the group-
     averaged attention times the value's L2 norm, renormalised per query: keys_values' h2o-vlen),
     summed over the new real queries;
   - ``replay`` [B, Hkv, L]: only in a context-reconstruction replay (a policy that `replays`, KVzip: the cache
     feeds the model an instruction to repeat the context, then the context, `h2o.replay`): per kept key, the
     largest probability any replay query of its group gave it, the softmax taken over the sinks, the chunk of
     context being reconstructed and the replay's own keys;
   and always ``queries``, the number of new queries.
   Key and value norms are not observations: a policy reads them from the new keys and values in
   `initial_state`, once per token.
3. `CompressedLayer.observe(observation)` lets the policy update its state in place
   (`Policy.update`), then, if the layer holds more than budget + buffer tokens, evicts: the policy
   ranks the slots (`Policy.rank`), `keep_indices` protects sinks and the recent window and picks
   the kept slots, and one gather moves keys, values, times, validity and every state tensor.

State is named float32 tensors [B, Hkv, L], one value per slot (`Policy.state`). `update` must be
slot-wise: a slot's new state depends only on its own state and observation. That is what lets one
gather move it with its key (and what the property tests check). `rank` may look at all slots.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..names import size_error

OBSERVATIONS = ("mass", "last", "count", "vmass", "replay")


@dataclass(frozen=True)
class Observation:
    """What the attention function saw at one forward (only the fields the policy asked for)."""

    queries: int = 0  # how many new queries this forward had (padding included)
    mass: torch.Tensor | None = None
    last: torch.Tensor | None = None
    count: torch.Tensor | None = None
    vmass: torch.Tensor | None = None
    replay: torch.Tensor | None = None


class Policy:
    """Base of every policy. A policy is a frozen dataclass with its sizes as int fields and these
    class attributes: `NAME` (the name's first word), `GRAMMAR` and `EXAMPLE` (a name that parses),
    `PATTERN` (the regex of its names after NAME), `observes` (a subset of `OBSERVATIONS`), `state` (names of its
    per-slot tensors)."""

    NAME: ClassVar[str]
    GRAMMAR: ClassVar[str]
    EXAMPLE: ClassVar[str]
    # the regex of a name after NAME, which `from_name` reads (`match`); the groups sinks, recent (or window: the
    # budget is then sinks + window) and budget are the sizes the `h2o` command checks before torch is imported
    # (`h2o.names`, whose table is generated from the registry). None: `from_name` reads its names its own way.
    PATTERN: ClassVar[str | None] = None
    observes: ClassVar[frozenset] = frozenset()
    state: ClassVar[tuple[str, ...]] = ()
    evicts: ClassVar[bool] = True
    has_score: ClassVar[bool] = False  # takes a scoring rule (`score=` / `--score`), like H2O's mean | sum
    # scores the context by replaying it (KVzip): the cache holds each forward of several tokens until the replay
    # has scored it (`h2o.replay`), which needs the tokenizer (`h2o.make_cache(..., tokenizer=)`)
    replays: ClassVar[bool] = False
    # Every evicting policy also has `sinks`, `recent` and `budget` (ints: fields or properties).

    @classmethod
    def match(cls, name: str) -> "re.Match | None":
        """`name` matched whole against NAME + PATTERN (None: no match, or no PATTERN)."""
        return None if cls.PATTERN is None else re.fullmatch(re.escape(cls.NAME) + cls.PATTERN, name)

    @classmethod
    def from_name(cls, name: str, score: str | None = None) -> "Policy | None":
        """The policy `name` spells, or None if it is not this policy's grammar (errors for bad sizes).
        `score` (rules with `has_score` only) is the scoring rule for a name that does not spell one."""
        raise NotImplementedError

    @classmethod
    def sized(cls, sinks: int, recent: int, budget: int) -> "Policy":
        """This rule with these sizes and its other parameters at their defaults (for sweeps and tests)."""
        return cls(sinks, recent, budget)

    @classmethod
    def at_budget(cls, budget: int) -> str:
        """The name of this rule at `budget` tokens: 4 sinks, a recent window of budget / 8."""
        return cls.sized(4, budget // 8, budget).name

    @property
    def name(self) -> str:
        raise NotImplementedError

    def with_budget(self, budget: int) -> "Policy":
        """This rule holding `budget` tokens per KV head (a head budget of an allocation, `h2o.policies.allocation`):
        the same sinks and parameters, the recent window clamped to what the sinks leave. Rules whose sizes are
        not (sinks, recent, budget) fields override it (StreamingLLM: the window is the rest)."""
        return dataclasses.replace(self, budget=budget, recent=min(self.recent, budget - self.sinks))

    def at_layer(self, layer: int) -> "Policy":
        """This rule for compressed layer `layer` of a cache (its row in per-layer tables): itself, unless it holds
        per-layer parameters (a fitted surrogate, `h2o.policies.kvzap`). `h2o.make_cache` asks every layer's rule."""
        return self

    def for_heads(self, heads: tuple[int, ...]) -> "Policy":
        """This rule for a head group holding KV heads `heads` of its layer (an allocation's): itself, unless it holds
        per-head parameters."""
        return self

    def query_weights(self, q: int, device) -> torch.Tensor | None:
        """Weights of the q new queries in `mass` (None: every query counts 1)."""
        return None

    def initial_state(self, keys: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """State of new slots [B, Hkv, q] from their keys and values [B, Hkv, q, D]; default zeros."""
        b, h, q, _ = keys.shape
        return {name: torch.zeros(b, h, q, dtype=torch.float32, device=keys.device) for name in self.state}

    def update(self, state: dict[str, torch.Tensor], obs: Observation, seen: int) -> None:
        """Update `state` in place from one forward's observation, slot by slot."""

    def rank(self, state: dict[str, torch.Tensor], times: torch.Tensor, seen: int, keys: torch.Tensor | None = None,
             values: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """[B, Hkv, L] priority of each slot (higher is kept) outside sinks and the recent window. Rules that
        rank by the kept keys or values themselves (key diversity, value-aware errors) read `keys`/`values`
        [B, Hkv, L, D]; `valid` [B, L] marks the slots that hold real tokens."""
        raise NotImplementedError


@dataclass(frozen=True)
class Sized(Policy):
    """The shape most rules share: the name <NAME>_<sinks>_<recent>_<budget>, those three ints, their checks.
    A rule with more parameters extends `PATTERN`, `from_name` and `name` (see a2sf.py, snapkv.py)."""

    PATTERN = r"_(?P<sinks>\d+)_(?P<recent>\d+)_(?P<budget>\d+)"

    sinks: int
    recent: int
    budget: int

    def __post_init__(self):
        check_sizes(self)

    @classmethod
    def from_name(cls, name, score=None):
        m = cls.match(name)
        return cls(int(m["sinks"]), int(m["recent"]), int(m["budget"])) if m else None

    @property
    def name(self) -> str:
        return f"{self.NAME}_{self.sinks}_{self.recent}_{self.budget}"


def check_sizes(policy, recent_name: str = "recent") -> None:
    """Sizes are ints (bools refused), sinks and recent >= 0, budget > 0, sinks + recent <= budget."""
    for field in dataclasses.fields(policy):
        value = getattr(policy, field.name)
        if field.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError(f"{type(policy).__name__}.{field.name} must be an int, got {value!r}")
    error = size_error(policy.sinks, policy.recent, policy.budget, recent_name)  # h2o.names: the `h2o` command
    if error:  # says the same before torch is imported
        raise ValueError(error)


def keep_indices(
    policy: Policy,
    state: dict[str, torch.Tensor] | torch.Tensor | None,
    times: torch.Tensor,
    valid: torch.Tensor,
    first_real: torch.Tensor,
    seen: int,
    buffer: int = 0,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    width: int | None = None,
    targets: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep after an eviction, per row and head: (idx [B, H, n], kept [B, n]).

    state: the policy's per-slot state {name: [B, H, L] float32} (or the tensor of a policy with one
        state tensor; None, or ignored, for a policy without state).
    times: [B, H, L] arrival index of the token in each slot (0 = first token seen).
    valid: [B, L] True where a slot holds a token the row still keeps (False: padding, or a token
        evicted earlier that stayed as a masked slot). Invalid slots are the same in every head.
    first_real: [B] arrival index of each row's first real token (its left-padding length).
    seen: number of tokens seen so far (padding included).
    buffer: lazy-eviction slack. Each row is judged on its own count of kept tokens, exactly as
        if it ran alone: a row holding more than budget + buffer is cut to `budget`, any other row
        keeps all its tokens and only sheds padding.
    keys, values: [B, H, L, D] the slots' keys and values, for rules that rank by them.
    width: the result's n where the caller knows it: the budget, when no slot is padding and the layer
        holds more than budget + buffer (every row evicts). None reads it from the rows' counts, the
        one value this function reads back to the host.
    targets: [B] tokens each row keeps in these heads (a head budget an allocation chose at this eviction,
        e.g. Ada-KV's split of a layer's budget); None: `budget` for rows over budget + buffer. A row whose
        target is at least its real tokens keeps them all.

    Within an evicting row, sinks (its first `sinks` real tokens) and its `recent` newest tokens are
    always kept and the rest is ranked by `policy.rank`. Rows keep different numbers of tokens,
    so the result has n = the largest count; a row's unused slots come first and are marked False
    in `kept`, then its kept tokens follow in temporal order (the same layout in every head).
    """
    budget = policy.budget
    if budget is None:
        raise ValueError(f"policy {policy.name!r} never evicts")
    real = valid.sum(-1)
    if targets is None:
        target = torch.where(real > budget + buffer, torch.full_like(real, budget), real)
    else:
        target = torch.minimum(targets.to(real), real)
    n = int(target.max()) if width is None else width
    rank = priorities(policy, state, times, valid, first_real, seen, keys, values, evicting=target < real)
    best = rank.topk(n, dim=-1, sorted=True).indices  # best first
    kept = torch.arange(n, device=times.device) < target.view(-1, 1, 1)  # [B, 1, n]
    # unused slots first, then kept tokens in temporal order
    order = torch.where(kept, best + times.shape[-1], best).sort(dim=-1).indices
    idx = best.gather(-1, order)
    return idx, kept.expand_as(best).gather(-1, order)[:, 0]


def priorities(policy: Policy, state, times: torch.Tensor, valid: torch.Tensor, first_real: torch.Tensor, seen: int,
               keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
               evicting: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B, H, L]: the policy's rank of each slot, +inf where it is always kept (sinks, the recent window,
    every slot of a row that does not evict: `evicting` [B] False) and -inf where it holds no real token. The
    order `keep_indices` keeps slots in; an allocation that splits a layer's budget across heads (Ada-KV) ranks
    the slots of all heads together by it."""
    if isinstance(state, torch.Tensor):  # the single state tensor of a one-state policy (ignored without state)
        if len(policy.state) > 1:
            raise ValueError(f"{policy.name} keeps {len(policy.state)} state tensors; pass them by name")
        state = dict(zip(policy.state, [state]))
    since_first = times - first_real.view(-1, 1, 1)
    protected = (since_first < policy.sinks) | (times >= seen - policy.recent)
    if evicting is not None:
        protected |= ~evicting.view(-1, 1, 1)  # rows that do not evict keep every token
    rank = policy.rank(state or {}, times, seen, keys=keys, values=values, valid=valid).to(torch.float32)
    rank = torch.where(protected, torch.inf, rank)
    return torch.where(valid.unsqueeze(1), rank, -torch.inf)
