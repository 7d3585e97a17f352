"""A compressed cache whose decode step torch.compile runs as one graph, without recompiling.

`h2o.make_cache(model, policy, static=True)` gives a `CompressedCache` of `StaticLayer`s. A forward of several
tokens (a prefill, a chunk) runs exactly as in the eager cache (`CompressedLayer`: same eviction, same kept
tokens); at its end the layer switches to its static layout, in which every one-token forward (a decode step)
has the same shapes and no Python branch that depends on data or on a counter:

- every per-slot tensor has a fixed `capacity` = budget + buffer + 1 slots (what the eager cache holds at most
  before it evicts during decoding); attention runs over all of them with a validity mask per row and KV head;
- the tokens seen are a 0-d tensor, the real tokens held and the next free slot are [B] tensors (one per row),
  all updated in place; padding is held by no slot (a padded row simply holds fewer tokens), and each row's
  left-padding length (`pads`) places its sinks, as in the eager cache;
- an eviction frees slots instead of moving tokens: when a row holds budget + buffer + 1 real tokens (exactly
  when the eager cache evicts that row), `torch.cond` runs the eviction graph, which ranks the slots in arrival order
  (so every rule sees exactly what it sees in the eager cache: SnapKV's pooling runs over temporal neighbours),
  keeps the rule's `budget` best as the eager cache does and marks the other buffer + 1 slots free (in the rows
  that are full; the others are unchanged); the next decode steps write into those slots. No key or value is copied at an eviction; the slots are not in arrival
  order (their `times` say it), which attention with original positions does not see.

So the decode step costs one scatter per per-slot tensor, the attention over `capacity` slots and, at an
eviction, one rank + top-k over `capacity` slots. A forward of several tokens after decoding (a chunk) first
gathers the kept slots back into arrival order (one host read: the tokens held); its mask sizes are the eager
layout's it is about to return to. A one-token forward's mask covers only the new token (`get_mask_sizes`: one
column, at its position), which is how a padding token fed one step at a time is known: it is attended by
itself, observed by no policy and held by no slot.

Limits, each an error where it applies: original positions only (reindex rotates keys by slot); a uniform rule
(head and layer budgets hold different numbers of tokens per head: `HeadGroupLayer`); `full` is transformers'
`StaticCache`. Under `torch.compile` a one-token forward given a 2-D `attention_mask` builds its mask inside the
graph from the tensor position, which fullgraph refuses (a graph break otherwise); `generate` builds the mask
outside the graph, so it compiles with padding.
"""

from __future__ import annotations

import torch

from .attention_kernels import decode_step, vlen_share
from .compressed_layer import CompressedLayer
from .handover import leave_pending
from .policies import Observation, priorities


class StaticLayer(CompressedLayer):
    """A `CompressedLayer` whose decode steps run in a fixed layout (see the module docstring).

    In the static layout the eager views (`keys`, `values`, `times`, `state`) span the whole capacity, and
    `slot_valid` [B, H, capacity] says which slots hold a kept token; `length` and `seen` read the held and seen
    counters back to the host (not inside a compiled step: the step uses the tensors)."""

    is_compileable = True

    def __init__(self, policy, buffer: int):
        super().__init__(policy, buffer, reindex=False)

    def _clear(self) -> None:
        super()._clear()
        self.static = False
        self.counters: dict[str, torch.Tensor] = {}  # seen (0-d), held and cursor ([B]): int64 on the layer's device
        self.slot_valid = self.order = None  # [B, H, capacity] bool; per row and head, the order free slots are written in

    @property
    def static_capacity(self) -> int:
        return self.budget + self.buffer + 1

    # --- counters: Python ints in the eager layout, tensors in the static one ---------------------------

    @property
    def length(self) -> int:
        """Slots a row holds (the fullest row's, in the static layout)."""
        return int(self.counters["held"].max()) if self.static else self._length

    @length.setter
    def length(self, value: int) -> None:
        self._length = value

    @property
    def seen(self) -> int:
        return int(self.counters["seen"]) if self.static else self._seen

    @seen.setter
    def seen(self, value: int) -> None:
        self._seen = value

    @property
    def _span(self) -> int:
        """Slots the views cover: the filled ones (eager) or the whole capacity (static)."""
        return self.capacity if self.static else self._length

    @property
    def times(self):
        return self.storage["times"][..., :self._span] if self.storage else None

    @property
    def valid(self):
        if self.static:  # per row: a slot any head of the row holds (heads hold different slots)
            return self.slot_valid.any(1)
        return self.storage["valid"][:, :self._length] if self.storage else None

    @property
    def state(self):
        return {name: self.storage[f"state.{name}"][..., :self._span] for name in self.policy.state} \
            if self.storage else {}

    def _view(self) -> None:
        self.keys = self.storage["keys"][:, :, :self._span]
        self.values = self.storage["values"][:, :, :self._span]

    def _copy_storage(self) -> dict[str, torch.Tensor]:
        """`CompressedCache.fork`: every buffer whole (in the static layout kept slots lie anywhere in the capacity,
        and the free ones must stay finite)."""
        return {name: buf.clone() for name, buf in self.storage.items()}

    def __deepcopy__(self, memo) -> StaticLayer:
        new = super().__deepcopy__(memo)
        if new.static and not torch.compiler.is_compiling():
            new._mark_static()
        return new

    # --- switching layouts (eager code: never inside a compiled decode step) ---------------------------

    def to_static(self) -> None:
        """From the eager layout (kept tokens in slots [0, length), arrival order) to the static one. A slot that
        holds padding or a row's unused slot (`valid` False) is a free slot of that row."""
        n, capacity = self._length, self.static_capacity
        if n > capacity:  # cannot happen after observe (held <= budget + buffer); a guard against misuse
            raise RuntimeError(f"layer holds {n} tokens, more than its static capacity {capacity}")
        if self.capacity != capacity:
            self._allocate(capacity)
        b, h = self.storage["times"].shape[:2]
        valid = self.storage["valid"][:, :n].clone()  # [B, n]
        self.storage["valid"].fill_(True)
        for name, buf in self.storage.items():  # free slots: finite (masked attention multiplies their values by 0)
            if name != "valid":
                (buf[:, :, n:] if buf.dim() == 4 else buf[..., n:]).zero_()
        slot_valid = torch.zeros(b, h, capacity, dtype=torch.bool, device=self.device)
        slot_valid[..., :n] = valid.unsqueeze(1)
        self.slot_valid = slot_valid
        # each row's free slots first, in slot order: the order the next decode steps write them in
        self.order = slot_valid.to(torch.int8).argsort(dim=-1, stable=True)
        self.counters = {"held": valid.sum(-1), "cursor": torch.zeros(b, dtype=torch.long, device=self.device),
                         "seen": torch.tensor(self._seen, dtype=torch.long, device=self.device)}
        self.static = True
        self._view()
        if not torch.compiler.is_compiling():
            self._mark_static()

    def _mark_static(self) -> None:
        for t in [*self.storage.values(), self.slot_valid, self.order, self.pads, *self.counters.values()]:
            torch._dynamo.mark_static_address(t)  # fixed addresses, so CUDA graphs can replay the step
            # and fixed shapes: a later batch size recompiles for its own (as transformers' StaticCache does)
            # instead of a dynamic batch dimension, which torch.cond's guards cannot express
            torch._dynamo.mark_static(t)

    def to_eager(self) -> None:
        """Back to the eager layout: each row's kept slots gathered in arrival order, after its unused slots when
        it holds fewer than the fullest row (as an eager eviction lays them out). One host read: the counts."""
        held = self.counters["held"]
        seen, width = int(self.counters["seen"]), int(held.max())
        capacity = self.capacity
        arrival = torch.where(self.slot_valid, self.times, -1).argsort(dim=-1)  # free slots first, then by time
        idx = arrival[..., capacity - width:]  # [B, H, width]
        kept = torch.arange(width, device=self.device) >= (width - held).unsqueeze(-1)  # [B, width]
        self.static = False
        self._length, self._seen = capacity, seen  # views over every slot for the gather
        self.slot_valid = self.order = None
        self.counters = {}
        self.has_padding = not bool(kept.all())
        self._keep(idx, kept)

    # --- transformers' layer interface --------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] > 1:  # a prefill or a chunk: the eager cache's path
            if self.static:
                self.to_eager()
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.static:  # a first forward of one token: from the (empty) eager layout
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.to_static()
        return self._write(key_states, value_states)

    def _new_slot(self) -> torch.Tensor:
        """[B, H, 1] the slot the current decode step writes in each row and head: the row's next free one."""
        b, h = self.slot_valid.shape[:2]
        return self.order.gather(-1, self.counters["cursor"].view(b, 1, 1).expand(b, h, 1))

    def _write(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """One token into the next free slot of each row and head: fixed-shape scatters, tensor counters. The
        slot becomes held (and the row's counters move) in `attend_static`, once the mask says the token is real."""
        if self.unobserved:
            super().update(key_states, value_states)  # raises UnobservedError with its explanation
        c = self.counters
        b, h = self.slot_valid.shape[:2]
        slot = self._new_slot()
        s = self.storage
        s["keys"].scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, key_states.shape[-1]), key_states)
        s["values"].scatter_(2, slot.unsqueeze(-1).expand(-1, -1, -1, value_states.shape[-1]), value_states)
        s["times"].scatter_(2, slot, c["seen"].view(1, 1, 1).expand(b, h, 1))
        if self._zero_state:  # a zero written in place: no state tensor made per step
            for name in self.policy.state:
                s[f"state.{name}"].scatter_(2, slot, 0.0)
        elif self.policy.state:
            for name, value in self.policy.initial_state(key_states, value_states).items():
                s[f"state.{name}"].scatter_(2, slot, value)
        c["seen"].add_(1)
        self.last_forward = 1
        self.unobserved = True
        leave_pending(self)
        return self.keys, self.values

    def observe(self, observation: Observation) -> bool:
        if self.static:
            raise RuntimeError("a static layer's decode step is observed by attend_static")
        evicted = super().observe(observation)
        self.to_static()  # after a forward of several tokens: the decode steps run in the static layout
        return evicted

    def get_seq_length(self):
        if self.static:
            seen = self.counters["seen"]
            return seen if torch.compiler.is_compiling() else int(seen)
        return self._seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # transformers 5.x passes the query length, 4.5x the cache_position tensor
        q = query if isinstance(query, int) else query.shape[0]
        if not self.static:
            return super().get_mask_sizes(query)
        if q > 1:  # a chunk: the sizes of the eager layout `update` returns to (`to_eager`: the fullest row's slots)
            held = int(self.counters["held"].max())
            return held + q, int(self.counters["seen"]) - held
        # a decode step attends its own slots with its own mask; the model's mask is read for one thing, whether the
        # new token is real: one column, at the new token's position (a tensor inside a compiled step: fixed shape)
        seen = self.counters["seen"]
        return 1, seen if torch.compiler.is_compiling() else int(seen)

    def kept_mask(self) -> torch.Tensor:
        if not self.static:
            return super().kept_mask()
        b, h = self.slot_valid.shape[:2]
        counts = torch.zeros(b, h, self.seen, dtype=torch.long, device=self.device)
        times = torch.where(self.slot_valid, self.times, 0)  # a free slot's time may be stale or unset
        return counts.scatter_add_(2, times, self.slot_valid.long()) > 0

    def head_tokens(self) -> torch.Tensor:
        """[B, H] tokens held per row and KV head (any layout)."""
        if self.static:
            return self.slot_valid.sum(-1)
        return self.valid.sum(-1, keepdim=True).expand(-1, self.storage["times"].shape[1])

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        out = super().slot_tensors()
        if self.static:
            out.update(slot_valid=self.slot_valid, order=self.order)
        return out

    def _select_rows(self, index: torch.Tensor) -> None:
        super()._select_rows(index)
        if self.static:
            index = index.to(self.device)
            self.slot_valid = self.slot_valid.index_select(0, index)
            self.order = self.order.index_select(0, index)

    # --- the decode step's attention and eviction -------------------------------------------------------

    def attend(self, call, query: torch.Tensor, attention_mask) -> torch.Tensor:
        """A forward of several tokens runs as in the eager cache; a decode step in the static layout."""
        if not self.static:
            return call.compressed(self, query, attention_mask)
        if not call.plain_softmax():
            raise ValueError("the static (compile-friendly) cache computes plain softmax attention; this model's "
                             "attention has options it does not reproduce (dropout, softcapping, position bias or "
                             "attention sinks): use static=False")
        return self.attend_static(query, call.scale(query), attention_mask)

    def attend_static(self, query: torch.Tensor, scaling: float, attention_mask: torch.Tensor | None = None):
        """One new query per row: attention over every slot with the validity mask, the policy's observations
        from the same probabilities, its state update, and the eviction graph when a row is full.
        `attention_mask` (the model's, over the new token only: `get_mask_sizes`) says which rows' new token is
        real; a padding token attends to itself and the row's kept tokens (as in the eager cache), adds nothing to
        any observation and is held by no slot. Returns the output [B, 1, Hq, Dv] (as sdpa_attention_forward lays
        it out)."""
        key, value = self.keys, self.values
        policy, wants = self.policy, self.policy.observes
        c = self.counters
        b, h = self.slot_valid.shape[:2]
        real = None
        if attention_mask is not None:  # [B, 1, 1, K]: its last column is the new token
            last = attention_mask[:, 0, -1, -1]
            real = last if last.dtype == torch.bool else last == 0
        slot = self._new_slot()
        self.slot_valid.scatter_(2, slot, True)  # the new token sees itself
        weights = policy.query_weights(1, key.device) if "mass" in wants else None
        out, mass, last, probs = decode_step(query, key, value, self.slot_valid, scaling, wants, real, weights,
                                              key.dtype != torch.float32)
        count = vmass = None
        if "count" in wants:  # the one query saw every slot its head holds (a free slot's state is reset when written)
            count = self.slot_valid.to(torch.float32)
            if real is not None:
                count *= real.view(b, 1, 1)
        if "vmass" in wants:
            vmass = vlen_share(probs.unsqueeze(3), value.to(torch.float32).norm(dim=-1),
                                None if real is None else real.view(b, 1), 0, 1)
        if policy.state:
            policy.update(self.state, Observation(queries=1, mass=mass, last=last, count=count, vmass=vmass),
                          c["seen"])
        else:
            policy.update({}, Observation(queries=1), c["seen"])
        if real is None:
            c["cursor"].add_(1)
            c["held"].add_(1)
        else:  # a padding token's slot stays free: the row's next token is written over it
            self.slot_valid.scatter_(2, slot, real.view(b, 1, 1).expand(b, h, 1))
            c["cursor"].add_(real)
            c["held"].add_(real)
            self.pads.add_(~real)
        self.unobserved = False
        self._evict_when_full()
        return out

    def _evict_when_full(self) -> None:
        c = self.counters
        full = c["held"] > self.budget + self.buffer  # [B]: the rows that evict (each as if it ran alone)
        operands = (self.storage["times"], self.storage["keys"], self.storage["values"], c["seen"], self.pads, full,
                    self.slot_valid, self.order, c["held"], c["cursor"], *self.state.values())
        if torch.compiler.is_compiling():
            valid, order, held, cursor = torch.cond(full.any(), self._evicted, self._unchanged, operands)
        elif bool(full.any()):  # eager use of the static layout: the same graph, run on the host's decision
            valid, order, held, cursor = self._evicted(*operands)
        else:
            return
        self.slot_valid.copy_(valid)
        self.order.copy_(order)
        c["held"].copy_(held)
        c["cursor"].copy_(cursor)

    def _unchanged(self, times, keys, values, seen, pads, full, valid, order, held, cursor, *state):
        return valid.clone(), order.clone(), held.clone(), cursor.clone()

    def _evicted(self, times, keys, values, seen, pads, full, valid, order, held, cursor, *state):
        """The eviction graph: in each full row (every slot holds a token), rank every slot in arrival order, as the
        eager cache would, keep the `budget` best, free the others (written first by the next decode steps); the
        other rows are unchanged."""
        arrival = times.argsort(dim=-1)  # [B, H, C]: slot of the i-th oldest token
        ordered = lambda t: t.gather(2, arrival if t.dim() == 3 else  # noqa: E731
                                     arrival.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))
        b, h, capacity = times.shape
        rows_valid = torch.ones(b, capacity, dtype=torch.bool, device=times.device)
        rank = priorities(self.policy, dict(zip(self.policy.state, [ordered(s) for s in state])), ordered(times),
                          rows_valid, pads, seen, ordered(keys), ordered(values))
        best = rank.topk(self.budget, dim=-1, sorted=True).indices  # positions in arrival order
        keep = torch.zeros(b, h, capacity, dtype=torch.bool, device=times.device).scatter_(2, arrival.gather(2, best),
                                                                                             True)
        free_first = keep.to(torch.int8).argsort(dim=-1, stable=True)
        rows = full.view(b, 1, 1)
        return (torch.where(rows, keep, valid), torch.where(rows, free_first, order),
                torch.where(full, self.budget, held), torch.where(full, 0, cursor))
