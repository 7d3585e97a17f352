"""`CompressedLayer`: one model layer's kept tokens under an evicting policy (the layer kind of a uniform rule).

Each `CompressedLayer` holds, per row and KV head, the kept keys and values in temporal order, plus per-slot
bookkeeping that moves with them through one gather; `h2o.cache` builds caches of them (and of head groups of them),
`h2o.static` extends it with the compile-friendly layout. See `h2o.cache` for the contract.
"""

from __future__ import annotations

import copy

import torch
from transformers.cache_utils import DynamicLayer

from . import rope as rope_ops
from .handover import leave_pending
from .policies import Observation, Policy, keep_indices, priorities


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
        # a fixed head group of an allocation, in one row: its budget fitted to the context the row has seen (a
        # `h2o.context_fit.RowFit`, and the group's place in its plans, `fit_group`)
        self.context_fit = None
        self.fit_group = 0
        self._zero_state = type(policy).initial_state is Policy.initial_state
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # tokens seen, padding included: the next token's arrival index
        self.length = self.capacity = 0  # slots filled, slots allocated
        self.last_forward = 0  # tokens of the latest update (a replay's included)
        # tokens of the latest forward that stays (a replay's do not), and the capacity it left: an eviction sizes the
        # buffers for a chunk like it, and a replay that grew them gives the growth back (`fit`)
        self.fed = 0
        self.fed_capacity = 0
        self.storage: dict[str, torch.Tensor] = {}  # name -> buffer over `capacity` slots
        self.pads = None
        self.has_padding = False  # any kept slot may be padding (a host-side flag: no per-step sync)
        self.padded = False  # any token seen may have been padding (`pads` may be nonzero; host-side, never cleared)
        self.unobserved = False  # updated, and its attention has not observed it yet
        self.model_ready = 0  # half-precision reindex: slots [0, model_ready) hold their `model_keys`
        self.model_slots = None  # (seen, kept) of a forward whose positions the model was given as slots
        self.budget = self.policy.budget  # a joint layer's changes with every split; back to the rule's on reset
        # tokens the layer may gain before it next evicts: its buffer, or a joint head's share of what its layer's
        # total + buffers leave after a split (`HeadGroupLayer.observed`)
        self.room = self.buffer
        # a replaying policy (KVzip, `h2o.replay`): `held` while a forward's tokens wait for their replay (no
        # eviction); `replay` (start, stop) the arrival indices of the chunk a replay forward reconstructs
        self.held = False
        self.replay = None

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
        if old:
            self._view()  # keys and values no longer view the old buffers, which are freed with them

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
        if self.replay is None:
            self.fed, self.fed_capacity = q, self.capacity
        self._view()
        self.seen += q
        self.unobserved = True
        leave_pending(self)
        return self.keys, self.values

    def attend(self, call, query: torch.Tensor, attention_mask) -> torch.Tensor:
        """The layer kind's side of the attention protocol (`h2o.handover.AttendingLayer`): one compressed run."""
        return call.compressed(self, query, attention_mask)

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
        if self.replay is not None:  # the replay's own keys and values never stay
            self._drop_newest(self.last_forward)
            return False
        return False if self.joint or self.held else self.evict_if_needed()

    def replay_keys(self) -> torch.Tensor:
        """A replay forward: bool [B, H, length], the keys its attention scores are taken over (the sinks, the chunk
        being reconstructed, the replay's own keys: the last `last_forward` slots)."""
        start, stop = self.replay
        times = self.times
        chosen = ((times >= start) & (times < stop)) | (times - self.pads.view(-1, 1, 1) < self.policy.sinks)
        chosen[..., self.length - self.last_forward:] = True
        return chosen & self.valid.unsqueeze(1)

    def _drop_newest(self, q: int) -> None:
        """Forget the last q tokens appended (a replay's): slots, arrival count and padding count as before them."""
        self.pads -= (~self.valid[:, self.length - q:]).sum(-1)
        self.length -= q
        self.seen -= q
        self.model_ready = min(self.model_ready, self.length)
        self._view()
        self._reset_free_slots()

    def fit(self) -> None:
        """After a replay: give back the slots its forwards grew the buffers by (the context's own forward left them at
        `fed_capacity`; an eviction since has sized them itself), so a replay leaves no memory behind."""
        if self.is_initialized and self.capacity > max(self.fed_capacity, self.length):
            self._allocate(max(self.fed_capacity, self.length))
            self._view()

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the tokens just appended are (left) padding: new_valid [B, q].

        A forward of several tokens (a prefill, a chunk) reads whether any is padding (one host sync). A
        one-token step does not: the stock mask comes only where padding may be (sdpa skips it for an
        all-real batch), so the layer then assumes padding, which costs masks but changes no result."""
        q = new_valid.shape[-1]
        self.valid[:, -q:] = new_valid
        self.pads += (~new_valid).sum(-1)
        padding = q == 1 or not bool(new_valid.all())
        self.has_padding = self.has_padding or padding
        self.padded = self.padded or padding

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
        here reads a value back to the host. A fixed head group of one row (`RowsLayer`) on a context shorter than
        its plan's largest budget is cut back to its budget on that context (`h2o.context_fit`)."""
        fitted = None
        if self.context_fit is not None:
            fitted = self.context_fit.budget(self)
            self.budget = self.policy.budget if fitted is None else fitted
        budget = self.budget
        if self.length <= budget + self.buffer:
            if fitted is not None:
                # a fitted budget falls as the row sees more tokens (its capped heads take back their share): the
                # buffers it was sized for would stay beside the growing buffers of those heads, past the rule's bytes
                limit = max(self.length, budget + self.room + 1)
                if self.capacity > limit:
                    self._allocate(limit)
                    self.fed_capacity = self.capacity
            return False
        targets = None
        if fitted is not None:  # the rule's own budget is the plan's: each row to the fitted one (as `keep_indices`)
            real = self.valid.sum(-1)
            targets = torch.where(real > budget + self.buffer, torch.full_like(real, budget), real)
        idx, kept = keep_indices(self.policy, self.state, self.times, self.valid, self.pads, self.seen, self.buffer,
                                 keys=self.keys, values=self.values, width=budget if not self.has_padding else None,
                                 targets=targets)
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
        # (the forward that stays: a replay's chunk, which never stays, sizes nothing)
        chunk = self.fed if self.fed <= self.rule_budget + self.buffer else 1
        if self.capacity > budget + self.room + chunk:
            self._allocate(budget + self.room + chunk)
        self.fed_capacity = self.capacity
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

    def __deepcopy__(self, memo) -> CompressedLayer:
        """A copy that shares nothing it could write (`CompressedCache.fork`): the kept slots of keys and values copied
        into buffers of the same capacity (the free slots are allocated, not copied: a forward writes them), every
        other buffer and attribute copied whole."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in vars(self).items():
            if name not in ("storage", "keys", "values"):
                setattr(new, name, copy.deepcopy(value, memo))
        new.storage = self._copy_storage()
        if self.storage:
            new._view()
        else:
            new.keys = new.values = None
        return new

    def _copy_storage(self) -> dict[str, torch.Tensor]:
        """The buffers, copied: the per-token vectors (keys, values, half-precision model keys) only in their kept
        slots, the rest (free slots ready for new tokens: valid, zero state) whole."""
        out = {}
        for name, buf in self.storage.items():
            if buf.dim() == 4:
                out[name] = torch.empty_like(buf)
                _slots(out[name], 0, self.length).copy_(_slots(buf, 0, self.length))
            else:
                out[name] = buf.clone()
        return out

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
