"""A transformers `Cache` whose layers keep a bounded set of tokens chosen by a policy.

Each `CompressedLayer` holds, per row and KV head, the kept keys and values in temporal order,
plus per-slot bookkeeping that moves with them through one gather: the arrival index of the token
(`times`), the policy's named float32 state (`state`, e.g. H2O's accumulated attention "score"),
and per row which slots are padding (`valid`). `keys`/`values` always hold exactly the kept tokens.

Eviction is lazy: after attention, a layer holding more than `budget + buffer` tokens is cut
back to exactly `budget`. The order of one forward (update, then the attention function's
`prepare` and `observe`) is the contract written in `h2o.policies.base`; a layer updated twice
without being observed raises, so a compressed cache can never run without its bound.
"""

from __future__ import annotations

import copy
import threading

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import rope as rope_ops
from .policies import Observation, Policy, keep_indices, priorities
from .policies.allocation import Allocated, LayerPlan, head_tables, split_budget

# The layer whose `update` ran last on this thread. The attention function of the same layer
# runs right after it and picks it up (checking it received that layer's keys).
_pending = threading.local()
# The same hand-over while torch.compile traces a forward (h2o.static): a plain dict, whose stores dynamo follows
# into later loads of the same trace, also across a torch.cond (it does not for a threading.local, nor for an
# object's attribute once a torch.cond was traced in between).
_traced: dict = {"layer": None}


def leave_pending(layer) -> None:
    """`update`'s hand-over of its layer to the attention function that runs next."""
    if torch.compiler.is_compiling():
        _traced["layer"] = layer
    else:
        _pending.layer = layer


def take_pending(key: torch.Tensor) -> "CompressedLayer | None":
    if torch.compiler.is_compiling():
        layer = _traced["layer"]
        _traced["layer"] = None
    else:
        layer = getattr(_pending, "layer", None)
        _pending.layer = None
    return layer if layer is not None and layer.keys is key else None


class UnobservedError(RuntimeError):
    """A compressed layer was updated, but h2o's attention never saw it: it could not evict."""


class CompressedLayer(DynamicLayer):
    """One layer's kept tokens under an evicting policy, in preallocated storage written in place.

    Every per-slot tensor (keys, values, times, validity, the half-precision reindex `model_keys` and
    `model_positions`, each state tensor) lives in one buffer of `capacity` slots; `keys`, `values`, `times`,
    `valid`, `model_keys` and `state` are views of the first `length` (the kept tokens). New tokens are written into the next
    slots; an eviction gathers the kept slots to the front of the same buffers. The capacity grows
    geometrically up to budget + buffer + q for a forward of q tokens, and an eviction sets it to budget +
    buffer + q (a chunk of at most budget + buffer tokens; + 1 after a longer forward, a prefill), so
    decoding, or feeding equal chunks, runs in the same buffers from then on.
    """

    is_croppable = False

    def __init__(self, policy: Policy, buffer: int, reindex: bool, rope: tuple | None = None, joint: bool = False,
                 rule_budget: int | None = None):
        super().__init__()
        self.policy, self.buffer, self.reindex, self.rope = policy, buffer, reindex, rope
        # an allocation's head or layer: the budget of the uniform rule it shares (its buffers grow geometrically only
        # up to that rule's size, and exactly as needed beyond it, so the allocation never holds more than the rule)
        self.rule_budget = policy.budget if rule_budget is None else rule_budget
        # a joint layer never evicts by itself: its `HeadGroupLayer` evicts all its heads together, and `budget` (the
        # tokens per head it is cut back to, set in _clear) is what that layer's last split gave it
        self.joint = joint
        self.is_initialized = False  # not set by the 4.56 base class
        self._zero_state = type(policy).initial_state is Policy.initial_state
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # tokens seen, padding included: the next token's arrival index
        self.length = self.capacity = 0  # slots filled, slots allocated
        self.last_forward = 0  # tokens of the latest update
        self.storage: dict[str, torch.Tensor] = {}  # name -> buffer over `capacity` slots
        self.pads = None
        self.has_padding = False  # any kept slot may be padding (a host-side flag: no per-step sync)
        self.unobserved = False  # updated, and its attention has not observed it yet
        self.model_ready = 0  # half-precision reindex: slots [0, model_ready) hold their `model_keys`
        self.model_slots = None  # (seen, kept) of a forward whose positions the model was given as slots
        self.budget = self.policy.budget  # a joint layer's changes with every split; back to the rule's on reset
        # tokens the layer may gain before it next evicts: its buffer, or a joint head's share of what its layer's
        # total + buffers leave after a split (`HeadGroupLayer.observed`)
        self.room = self.buffer

    # Views of the first `length` slots. `keys` and `values` are attributes (set by `update` and evictions:
    # transformers reads them, and the attention function checks it got them); the rest are made on access.

    @property
    def times(self) -> torch.Tensor | None:
        """[B, H, length] arrival index of the token in each slot."""
        return self.storage["times"][..., :self.length] if self.storage else None

    @property
    def valid(self) -> torch.Tensor | None:
        """[B, length] True where a slot holds a real, kept token."""
        return self.storage["valid"][:, :self.length] if self.storage else None

    @property
    def model_keys(self) -> torch.Tensor | None:
        """[B, H, length, D] half-precision reindex only: each kept key exactly as the model handed it over,
        rotated at `model_positions` [B, H, length]; an eviction rotates it once, straight to the new slot."""
        return self.storage["model_keys"][:, :, :self.length] if "model_keys" in self.storage else None

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The policy's per-slot state {name: [B, H, length] float32}, updated in place by the policy."""
        return {name: self.storage[f"state.{name}"][..., :self.length] for name in self.policy.state} \
            if self.storage else {}

    @property
    def scores(self) -> torch.Tensor | None:
        """H2O's accumulated attention per slot (the "score" state), or None for rules without it."""
        return self.state.get("score")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self._shapes = {  # name -> (shape with the slot axis as None, dtype); the slot axis is -1 or -2
            "keys": ((b, h, None, d), key_states.dtype), "values": ((b, h, None, value_states.shape[-1]), value_states.dtype),
            "times": ((b, h, None), torch.long), "valid": ((b, None), torch.bool),
            **{f"state.{name}": ((b, h, None), torch.float32) for name in self.policy.state},
        }
        if self.reindex and self.dtype in (torch.float16, torch.bfloat16):
            self._shapes["model_keys"] = self._shapes["keys"]
            self._shapes["model_positions"] = ((b, h, None), torch.int32)
        self.pads = torch.zeros(b, dtype=torch.long, device=self.device)
        self._allocate(0)
        self.is_initialized = True

    def _allocate(self, capacity: int) -> None:
        """Fresh buffers of `capacity` slots holding the current first `length` slots. Free slots are ready for
        new tokens: valid True, state zero (a default-state policy's), so an update writes only keys, values, times."""
        old = self.storage
        self.storage = {}
        for name, (shape, dtype) in self._shapes.items():
            size = tuple(capacity if n is None else n for n in shape)
            fill = {"valid": torch.ones, **({f"state.{k}": torch.zeros for k in self.policy.state}
                                            if self._zero_state else {})}.get(name, torch.empty)
            buf = fill(size, dtype=dtype, device=self.device)
            if old and self.length:
                _slots(buf, 0, self.length).copy_(_slots(old[name], 0, self.length))
            self.storage[name] = buf
        self.capacity = capacity

    def _view(self) -> None:
        """Point keys and values at the first `length` slots."""
        self.keys = self.storage["keys"][:, :, :self.length]
        self.values = self.storage["values"][:, :, :self.length]

    def _reset_free_slots(self) -> None:
        """After an eviction: the slots past `length` held evicted tokens; make them ready for new ones."""
        self.storage["valid"][:, self.length:].fill_(True)
        if self._zero_state:
            for name in self.policy.state:
                self.storage[f"state.{name}"][..., self.length:].zero_()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.unobserved:
            raise UnobservedError(
                f"a {self.policy.name} cache layer got new tokens, but h2o's attention never saw the previous "
                "ones, so it could not evict: the model no longer runs h2o's attention (h2o.restore was called, "
                "the attention implementation was switched, or the cache is used with another model). Make a new "
                "cache with h2o.make_cache(model, ...) for the model you run.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        start, stop = self.length, self.length + q
        if stop > self.capacity:  # geometric growth up to budget + buffer (room) + q; beyond the rule's, as needed
            grown = min(self.budget + self.room + q, 2 * self.capacity, max(self.rule_budget + self.buffer + q, stop))
            self._allocate(max(stop, grown))
        s = self.storage
        s["keys"][:, :, start:stop].copy_(key_states)  # model_keys' new slots: `reposition` or `_keep_model_keys`
        s["values"][:, :, start:stop].copy_(value_states)
        if q == 1:
            s["times"][..., start].fill_(self.seen)
        else:
            s["times"][..., start:stop].copy_(torch.arange(self.seen, self.seen + q, device=self.device))
        if self.policy.state and not self._zero_state:  # valid and zero state are ready in free slots
            for name, value in self.policy.initial_state(key_states, value_states).items():
                s[f"state.{name}"][..., start:stop].copy_(value)
        self.length, self.last_forward = stop, q
        self._view()
        self.seen += q
        self.unobserved = True
        leave_pending(self)
        return self.keys, self.values

    # --- called by the attention function, in this order: prepare, then observe -------------

    def prepare(self, query: torch.Tensor, attention_mask: torch.Tensor | None, position_ids,
                causal_by_default: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Before attention: mark the new tokens' padding (from the stock mask), move keys and queries to
        their slots (reindex), build the mask over the kept slots. Returns (query, mask, new_valid)."""
        q = query.shape[-2]
        new_valid = None
        if attention_mask is not None:  # which new tokens are real: the stock mask's last (always real) row
            last_row = attention_mask[:, 0, -1, -q:]
            new_valid = last_row if last_row.dtype == torch.bool else last_row == 0
            self.mark_padding(new_valid)
        if self.reindex and self.model_slots != (self.seen - q, self.length - q):
            query = self.reposition(query, position_ids)  # the model rotated at its own positions: move to slots
        self.model_slots = None
        return query, self.attention_mask(q, causal_by_default), new_valid

    def observe(self, observation: Observation) -> bool:
        """After attention: the policy updates its state from what attention saw, then the layer evicts
        if it holds more than budget + buffer tokens. Returns whether it evicted."""
        if self.policy.state:
            state = self.state
            views = tuple(state.values())
            self.policy.update(state, observation, self.seen)
            if any(a is not b for a, b in zip(views, state.values(), strict=True)):
                raise TypeError(f"{type(self.policy).__name__}.update must update its state tensors in place "
                                "(state['x'] += ..., .copy_(...)), not replace them: the cache's storage holds them")
        else:  # a rule without per-slot state (StreamingLLM): no views to make
            self.policy.update({}, observation, self.seen)
        self.unobserved = False
        return False if self.joint else self.evict_if_needed()

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the tokens just appended are (left) padding: new_valid [B, q].

        A forward of several tokens (a prefill, a chunk) reads whether any is padding (one host sync). A
        one-token step does not: the stock mask comes only where padding may be (sdpa skips it for an
        all-real batch), so the layer then assumes padding, which costs masks but changes no result."""
        q = new_valid.shape[-1]
        self.valid[:, -q:] = new_valid
        self.pads += (~new_valid).sum(-1)
        self.has_padding = self.has_padding or q == 1 or not bool(new_valid.all())

    def reposition(self, query: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """reindex mode, when the model rotated the new keys and queries at its own positions (not at their
        slots, see `CompressedCache.slot_positions`): move them to their slots."""
        q = query.shape[-2]
        kept = self.keys.shape[-2] - q
        if position_ids is None:  # what the model uses when it is given none
            position_ids = torch.arange(self.seen - q, self.seen, device=self.device)
        position = position_ids.to(self.device).view(-1, 1, q)  # [B or 1, 1, q]
        if "model_keys" in self.storage:  # the model's keys as handed over, and the positions they are rotated at
            self._keep_model_keys(kept)
            self.storage["model_keys"][:, :, kept:self.length].copy_(self.keys[:, :, kept:])
            self.storage["model_positions"][..., kept:self.length].copy_(position.expand(self.keys.shape[0], -1, -1))
            self.model_ready = self.length
        delta = torch.arange(kept, kept + q, device=self.device) - position
        inv_freq, dims = self.rope
        self.keys[:, :, kept:] = rope_ops.rotate(self.keys[:, :, kept:], delta, inv_freq, dims)
        return rope_ops.rotate(query, delta, inv_freq, dims)

    def _keep_model_keys(self, stop: int) -> None:
        """Copy the keys of slots [model_ready, stop) to `model_keys`: they are still as the model handed them
        over, rotated at their slot (the model was given slot positions), so their position is the slot."""
        start = self.model_ready
        if start < stop:
            self.storage["model_keys"][:, :, start:stop].copy_(self.storage["keys"][:, :, start:stop])
            self.storage["model_positions"][..., start:stop].copy_(torch.arange(start, stop, device=self.device))
            self.model_ready = stop

    def attention_mask(self, q: int, causal_by_default: bool) -> torch.Tensor | None:
        """Boolean mask [B, 1, q, L] over the kept slots, or None where no mask is needed: a single
        query seeing every slot, or (if the attention is causal without a mask) a fresh prefill."""
        length = self.keys.shape[-2]
        kept = length - q
        if not self.has_padding and (q == 1 or (kept == 0 and causal_by_default)):
            return None
        causal = torch.ones(q, length, dtype=torch.bool, device=self.device).tril(diagonal=kept)
        mask = causal & self.valid[:, None, None, :]
        # A padding query sees nothing real; let it see itself so no row is empty (no NaN).
        own = torch.zeros_like(causal)
        own[:, kept:] = torch.eye(q, dtype=torch.bool, device=self.device)
        return mask | own

    def evict_if_needed(self) -> bool:
        """Cut back to the budget if over budget + buffer: one gather moves every per-slot tensor to the front
        of its buffer (or of a fresh, smaller one, after a larger forward). Without padding nothing
        here reads a value back to the host."""
        budget = self.budget
        if self.length <= budget + self.buffer:
            return False
        idx, kept = keep_indices(self.policy, self.state, self.times, self.valid, self.pads, self.seen, self.buffer,
                                 keys=self.keys, values=self.values, width=budget if not self.has_padding else None)
        self._keep(idx, kept)
        return True

    def priorities(self) -> torch.Tensor:
        """[B, H, length] the policy's priority of each slot as an eviction now would rank it (`priorities`)."""
        return priorities(self.policy, self.state, self.times, self.valid, self.pads, self.seen, self.keys, self.values)

    def evict_to(self, targets: torch.Tensor, width: int, uneven: bool, room: int) -> None:
        """Cut each row back to `targets` [B] tokens (width = their largest, and `uneven` = whether some row gets
        fewer, both known on the host): an allocation's split (`HeadGroupLayer`). The layer's budget becomes
        `width` and its room `room` (the tokens it may gain before the next split), so its buffers shrink or grow to
        width + room + a forward's tokens."""
        idx, kept = keep_indices(self.policy, self.state, self.times, self.valid, self.pads, self.seen, self.buffer,
                                 keys=self.keys, values=self.values, width=width, targets=targets)
        self.budget, self.room = width, room
        self.has_padding = self.has_padding or uneven
        self._keep(idx, kept)

    def _keep(self, idx: torch.Tensor, kept: torch.Tensor) -> None:
        """Keep slots idx [B, H, n] (kept [B, n]: False for a row's unused slots): one gather of every buffer."""
        budget = self.budget
        n = idx.shape[-1]
        if "model_keys" in self.storage:
            self._keep_model_keys(self.length)
        moved = {name: _gather(_slots(buf, 0, self.length), idx) for name, buf in self.storage.items()
                 if name not in ("keys", "valid")}
        moved["valid"] = kept
        if "model_keys" in moved:
            # half precision: rotate each kept key from the model's own key straight to its new slot, so its error
            # stays at one rounding over the model's key however many evictions it lives through (re-rotating
            # the stored, rounded key by each shift would add one rounding per eviction)
            moved["keys"] = rope_ops.rotate(moved["model_keys"],
                                            torch.arange(n, device=self.device) - moved["model_positions"], *self.rope)
        else:
            moved["keys"] = _gather(self.keys, idx)
            if self.reindex:  # float32: one rotation by the shift adds ~1e-7 relative error per eviction
                moved["keys"] = rope_ops.rotate(moved["keys"], torch.arange(n, device=self.device) - idx, *self.rope)
        self.length = 0
        # back to budget + buffer (room) + this forward's tokens (a chunk), or + 1 after a longer forward (a prefill)
        # (a chunk: at most the uniform rule's budget + buffer, for every head of an allocation alike)
        chunk = self.last_forward if self.last_forward <= self.rule_budget + self.buffer else 1
        if self.capacity > budget + self.room + chunk:
            self._allocate(budget + self.room + chunk)
        for name, tensor in moved.items():
            _slots(self.storage[name], 0, n).copy_(tensor)
        self.length = self.model_ready = n
        self._view()
        self._reset_free_slots()
        if self.has_padding:
            self.has_padding = not bool(kept.all())

    # --- transformers' layer interface ------------------------------------------------------

    def get_seq_length(self) -> int:
        # Tokens seen, not kept: default position ids and the mask's query offset derive from it.
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # transformers 5.x passes the query length, 4.5x the cache_position tensor.
        q = query if isinstance(query, int) else query.shape[0]
        return self.length + q, self.seen - self.length

    def get_max_length(self) -> int:
        return -1

    def kept_mask(self) -> torch.Tensor:
        """[B, H, seen] True where the layer keeps that token (arrival index) for that row and KV head."""
        b, h = self.storage["times"].shape[:2]
        mask = torch.zeros(b, h, self.seen, dtype=torch.bool, device=self.device)
        return mask.scatter_(2, self.times, self.valid.unsqueeze(1).expand_as(self.times))

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds, by name: the buffers at their full capacity, and `pads`."""
        return {**self.storage, "pads": self.pads} if self.is_initialized else {}

    def _select_rows(self, index: torch.Tensor) -> None:
        index = index.to(self.device)
        self.storage = {name: buf.index_select(0, index) for name, buf in self.storage.items()}
        self.pads = self.pads.index_select(0, index)
        self._shapes = {name: ((len(index), *shape[1:]), dtype) for name, (shape, dtype) in self._shapes.items()}
        self._view()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_rows(torch.as_tensor(indices, device=self.device).flatten())

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            rows = self.keys.shape[0]
            self._select_rows(torch.arange(rows, device=self.device).repeat_interleave(repeats))


def _slots(buf: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Slots start..stop of a buffer (the slot axis: -2 for keys and values, -1 for the others)."""
    return buf[:, :, start:stop] if buf.dim() == 4 else buf[..., start:stop]


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Slots idx [B, H, n] of t [B, H, L(, D)]."""
    if t.dim() == 4:
        return t.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
    return t.gather(2, idx)


class HeadGroupLayer(DynamicLayer):
    """One model layer whose KV heads hold different numbers of tokens: each group of heads is a `CompressedLayer`
    of its own over those heads (its own preallocated buffers, sized by its own budget), so a head holds, and
    `kv_bytes` counts, only its own tokens; nothing is masked. h2o's attention function runs once per group on the
    group's keys and its query heads, and writes the outputs back in head order.

    A joint layer (Ada-KV) has one group per head; after attention, once its heads hold more than
    heads x (budget + buffer) tokens together, it ranks all their slots together (`split_budget`), reads the
    per-head counts back to the host (one read per eviction: the new lengths are data-dependent shapes) and
    cuts each head to its count with the usual one gather per head."""

    is_croppable = False

    def __init__(self, plan: LayerPlan, rule: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        super().__init__()
        self.plan = plan
        self.heads = sum(len(heads) for heads, _ in plan.groups)
        self.sublayers = [CompressedLayer(rule.with_budget(budget), buffer, reindex, rope, joint=plan.joint,
                                          rule_budget=rule.budget)
                          for _, budget in plan.groups]
        self.buffer, self.is_initialized = buffer, False
        self._index: dict = {}  # (device, query groups) -> per group (KV head index, query head index)

    def index(self, device, groups: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per group, its KV heads and its query heads (GQA: KV head h serves query heads h*groups .. + groups-1)."""
        key = (device, groups)
        if key not in self._index:
            self._index[key] = [(torch.tensor(heads, device=device),
                                 torch.tensor([h * groups + g for h in heads for g in range(groups)], device=device))
                                for heads, _ in self.plan.groups]
        return self._index[key]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for (kv, _), sub in zip(self.index(key_states.device), self.sublayers):
            sub.update(key_states.index_select(1, kv), value_states.index_select(1, kv))
        self.is_initialized = True
        self.keys, self.values = self.sublayers[0].keys, self.sublayers[0].values  # how attention finds the layer
        leave_pending(self)
        return self.keys, self.values

    def observed(self) -> bool:
        """After every group's attention: a joint layer over its total budget + buffers splits and evicts."""
        subs = self.sublayers
        if not self.plan.joint or (sum(sub.length for sub in subs) <= self.plan.total + self.heads * self.buffer
                                   and all(sub.length <= sub.budget + self.buffer for sub in subs)):
            return False
        counts = split_budget([sub.priorities() for sub in subs], self.plan.total, self.plan.floor)
        # each row as if it ran alone: only a row holding more than its total budget + buffers evicts
        real = torch.stack([sub.valid.sum(-1) for sub in subs], dim=1)  # [B, H]
        counts = torch.where(real.sum(-1, keepdim=True) > self.plan.total + self.heads * self.buffer, counts, real)
        rows = counts.tolist()  # the one host read of an eviction: the heads' new lengths are data-dependent shapes
        widths = [max(row[h] for row in rows) for h in range(len(subs))]
        # the heads grow together, one slot each a token: the next split comes once they pass total + buffers, so
        # no head needs more than its width + `room` slots before it (the uniform rule's buffer, after a split)
        room = max(0, (self.plan.total + self.heads * self.buffer - sum(widths)) // self.heads)
        for h, sub in enumerate(subs):
            # rows given fewer tokens than the head's width get unused slots first: masked like padding
            sub.evict_to(counts[:, h], widths[h], uneven=min(row[h] for row in rows) < widths[h], room=room)
        return True

    @property
    def length(self) -> int:
        """The longest head's kept tokens."""
        return max(sub.length for sub in self.sublayers)

    @property
    def seen(self) -> int:
        return self.sublayers[0].seen

    def head_lengths(self) -> list[int]:
        """Kept tokens per KV head, in head order."""
        return self._per_head(lambda sub: sub.length)

    def head_bounds(self) -> list[int]:
        """What each KV head may hold after a forward: its budget + buffer (a joint head's: the last split's width
        + room)."""
        return self._per_head(lambda sub: sub.budget + sub.room)

    def _per_head(self, value) -> list[int]:
        out = [0] * self.heads
        for (heads, _), sub in zip(self.plan.groups, self.sublayers):
            for h in heads:
                out[h] = value(sub)
        return out

    def kept_mask(self) -> torch.Tensor:
        first = self.sublayers[0].kept_mask()
        out = first.new_zeros(first.shape[0], self.heads, first.shape[-1])
        for (kv, _), sub in zip(self.index(first.device), self.sublayers):
            out[:, kv] = sub.kept_mask()
        return out

    def get_seq_length(self) -> int:
        return self.sublayers[0].get_seq_length()

    def get_mask_sizes(self, query) -> tuple[int, int]:
        return self.sublayers[0].get_mask_sizes(query)

    def get_max_length(self) -> int:
        return -1

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{name}": t for i, sub in enumerate(self.sublayers) for name, t in sub.slot_tensors().items()}

    def reset(self) -> None:
        for sub in self.sublayers:
            sub.reset()
        self.keys = self.values = None
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._each("reorder_cache", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._each("batch_select_indices", indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._each("batch_repeat_interleave", repeats)

    def _each(self, method: str, arg) -> None:
        for sub in self.sublayers:
            getattr(sub, method)(arg)
        if self.is_initialized:
            self.keys, self.values = self.sublayers[0].keys, self.sublayers[0].values


class RowsLayer(HeadGroupLayer):
    """A joint (Ada-KV) layer of a batch: one `HeadGroupLayer` per row, made at the first forward, so each row
    splits its own budget across its heads exactly as it would alone, and each (row, head) holds only that row's
    tokens for that head. A batch of B rows holds at most B x (total + heads x buffer) slots, the uniform rule's
    bound (one [B, H, L] layout would hold, per head, its widest row's share in every row). h2o's attention runs
    once per row and head; beam search and batch selection move whole rows (a row chosen twice is copied)."""

    def __init__(self, plan: LayerPlan, rule: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        DynamicLayer.__init__(self)
        self.plan, self.rule, self.reindex, self.rope = plan, rule, reindex, rope
        self.heads = sum(len(heads) for heads, _ in plan.groups)
        self.buffer, self.is_initialized = buffer, False
        self.rows: list[HeadGroupLayer] = []

    @property
    def sublayers(self) -> list[CompressedLayer]:
        return [sub for row in self.rows for sub in row.sublayers]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        batch = key_states.shape[0]
        if not self.rows:
            self.rows = [HeadGroupLayer(self.plan, self.rule, self.buffer, self.reindex, self.rope)
                         for _ in range(batch)]
        elif len(self.rows) != batch:
            raise ValueError(f"a cache holding {len(self.rows)} rows was given a forward of {batch} rows: "
                             "reset() it (or make a new cache) for a new batch")
        for b, row in enumerate(self.rows):
            row.update(key_states[b:b + 1], value_states[b:b + 1])
        self.is_initialized = True
        self.keys, self.values = self.rows[0].keys, self.rows[0].values
        leave_pending(self)
        return self.keys, self.values

    def observed(self) -> bool:
        return any([row.observed() for row in self.rows])

    @property
    def length(self) -> int:
        return max((row.length for row in self.rows), default=0)

    @property
    def seen(self) -> int:
        return self.rows[0].seen if self.rows else 0

    def head_lengths(self) -> list[int]:
        """Kept tokens per KV head, in head order: the row holding most in that head."""
        return [max(n) for n in zip(*(row.head_lengths() for row in self.rows))] if self.rows else [0] * self.heads

    def head_bounds(self) -> list[int]:
        if not self.rows:
            return [budget + self.buffer for heads, budget in self.plan.groups for _ in heads]
        return [max(n) for n in zip(*(row.head_bounds() for row in self.rows))]

    def kept_mask(self) -> torch.Tensor:
        return torch.cat([row.kept_mask() for row in self.rows])

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # each row reads only the mask's last q columns (which new tokens are padding): any kept length serves
        q = query if isinstance(query, int) else query.shape[0]
        return self.length + q, self.seen - self.length

    def reset(self) -> None:
        self.rows = []
        self.keys = self.values = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._take(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._take(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._take([b for b in range(len(self.rows)) for _ in range(repeats)])

    def _take(self, index) -> None:
        """Rows `index` (in that order): a row taken more than once is copied, so rows never share buffers."""
        if not self.rows:
            return
        taken, new = set(), []
        for b in torch.as_tensor(index).flatten().tolist():
            new.append(copy.deepcopy(self.rows[b]) if b in taken else self.rows[b])
            taken.add(b)
        self.rows = new
        self.keys, self.values = self.rows[0].keys, self.rows[0].values


class CompressedCache(Cache):
    """A `Cache` of one layer per model layer; a `full` policy uses plain `DynamicLayer`s."""

    def __init__(self, policy: Policy | Allocated, num_layers: int, positions: str = "original", buffer: int = 64,
                 rope: tuple | None = None, kv_heads: int | None = None, head_scores=None, static: bool = False):
        reindex = positions == "reindex"
        if head_scores is not None:  # checked whichever policy: malformed scores are an error, never ignored
            head_scores = head_tables(head_scores)
        if static:  # the compile-friendly layout (h2o.static)
            check_static(policy, positions)
            from .static import StaticLayer

            layers = [StaticLayer(policy, buffer) for _ in range(num_layers)]
        elif isinstance(policy, Allocated):  # head and layer budgets: one plan per layer
            if kv_heads is None:
                raise ValueError(f"{policy.name}: an allocation needs the model's number of KV heads (kv_heads=)")
            layers = [CompressedLayer(policy.rule.with_budget(plan.groups[0][1]), buffer, reindex, rope,
                                      rule_budget=policy.rule.budget)
                      if plan.uniform else (RowsLayer if plan.joint else HeadGroupLayer)(plan, policy.rule, buffer,
                                                                                          reindex, rope)
                      for plan in policy.plan(num_layers, kv_heads, head_scores)]
        elif policy.evicts:
            layers = [CompressedLayer(policy, buffer, reindex, rope) for _ in range(num_layers)]
        else:
            layers = [DynamicLayer() for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.policy, self.positions, self.buffer, self.static = policy, positions, buffer, static

    def __repr__(self) -> str:
        static = ", static" if self.static else ""
        return f"CompressedCache({self.policy.name}, positions={self.positions}, buffer={self.buffer}{static})"

    def slot_positions(self, q: int, device) -> torch.Tensor | None:
        """reindex mode: the position ids [1, q] that make the model rotate the next forward's q tokens at their
        slots, so that no layer re-rotates them (`h2o.make_cache` installs the model hook that passes them);
        None where they do not apply (original positions, a policy that never evicts, layers holding different
        numbers of tokens). Each layer checks, in its `prepare`, that it got these positions (else it re-rotates)."""
        if self.positions != "reindex" or not self.policy.evicts:
            return None
        layers = self.compressed_layers()  # none yet: an Ada-KV cache of a batch makes its rows at the first forward
        kept = layers[0].length if layers else 0
        if any(layer.length != kept for layer in layers):
            return None
        for layer in layers:
            layer.model_slots = (layer.seen, kept)
        return torch.arange(kept, kept + q, device=device).unsqueeze(0)

    def compressed_layers(self) -> list[CompressedLayer]:
        """Every `CompressedLayer`: one per model layer, or one per head group of a `HeadGroupLayer`."""
        return [sub for layer in self.layers for sub in getattr(layer, "sublayers", [layer])
                if isinstance(sub, CompressedLayer)]

    def kept_lengths(self) -> list[int]:
        """Tokens each layer holds now (its longest head's, where heads hold different numbers)."""
        return [layer.length if isinstance(layer, (CompressedLayer, HeadGroupLayer)) else
                layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
                for layer in self.layers]

    def head_lengths(self) -> list[list[int]]:
        """Tokens each KV head of each layer holds now."""
        return [layer.head_lengths() if isinstance(layer, HeadGroupLayer) else
                [length] * _heads(layer) for layer, length in zip(self.layers, self.kept_lengths())]

    def head_bounds(self) -> list[list[int | None]]:
        """What each KV head may hold after any forward (budget + buffer; None: a full cache's layer)."""
        return [layer.head_bounds() if isinstance(layer, HeadGroupLayer) else
                [layer.budget + layer.buffer if isinstance(layer, CompressedLayer) else None] * _heads(layer)
                for layer in self.layers]

    def evicted(self) -> bool:
        """Whether any head of any layer holds fewer tokens than it has seen."""
        return any(layer.length < layer.seen for layer in self.compressed_layers())

    def kv_bytes(self, bookkeeping: bool = True) -> int:
        """Exact bytes held by the cache: keys, values and (`bookkeeping`) the per-slot bookkeeping of every head
        (a compressed layer's buffers at their allocated capacity, not only the filled slots: up to buffer + 1
        free slots per head after an eviction, plus the geometric growth of a head that has not evicted yet; a
        head group's buffers hold only its own heads, and each group has its own validity row and pad counts)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, (CompressedLayer, HeadGroupLayer)):
                tensors = [t for name, t in layer.slot_tensors().items()
                           if bookkeeping or name.rpartition(".")[2] in ("keys", "values")]
            else:
                tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                           if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total


def check_static(policy, positions: str) -> None:
    """What the static (compile-friendly) layout holds: a uniform evicting rule with original positions."""
    if isinstance(policy, Allocated):
        raise ValueError(f"{policy.name}: head and layer budgets hold different numbers of tokens per head; the "
                         "static (compile-friendly) cache holds a uniform rule. Use static=False for allocations")
    if not policy.evicts:
        raise ValueError("a static full cache is transformers' StaticCache (cache_implementation='static'); "
                         "static=True is for evicting rules")
    if positions != "original":
        raise ValueError("the static (compile-friendly) cache keeps original positions: its slots are not in "
                         "arrival order, so positions='reindex' (keys rotated by slot) needs static=False")


def _heads(layer) -> int:
    keys = getattr(layer, "keys", None)
    return keys.shape[1] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
