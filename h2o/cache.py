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

import threading

import torch
from transformers.cache_utils import Cache, DynamicLayer

from . import rope as rope_ops
from .policies import Observation, Policy, keep_indices

# The layer whose `update` ran last on this thread. The attention function of the same layer
# runs right after it and picks it up (checking it received that layer's keys).
_pending = threading.local()


def take_pending(key: torch.Tensor) -> "CompressedLayer | None":
    layer = getattr(_pending, "layer", None)
    _pending.layer = None
    return layer if layer is not None and layer.keys is key else None


class UnobservedError(RuntimeError):
    """A compressed layer was updated, but h2o's attention never saw it: it could not evict."""


class CompressedLayer(DynamicLayer):
    """One layer's kept tokens under an evicting policy."""

    is_croppable = False

    def __init__(self, policy: Policy, buffer: int, reindex: bool, rope: tuple | None = None):
        super().__init__()
        self.policy, self.buffer, self.reindex, self.rope = policy, buffer, reindex, rope
        self.is_initialized = False  # not set by the 4.56 base class
        self._clear()

    def _clear(self) -> None:
        self.seen = 0  # tokens seen, padding included: the next token's arrival index
        self.times = self.valid = self.pads = self.pre_keys = None
        self.state: dict[str, torch.Tensor] = {}
        self.has_padding = False  # any kept slot is padding (a host-side flag: no per-step sync)
        self.unobserved = False  # updated, and its attention has not observed it yet

    @property
    def scores(self) -> torch.Tensor | None:
        """H2O's accumulated attention per slot (the "score" state), or None for rules without it."""
        return self.state.get("score")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor = None) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, d = key_states.shape
        self.keys = key_states.new_empty(b, h, 0, d)
        self.values = value_states.new_empty(b, h, 0, value_states.shape[-1])
        self.times = torch.empty(b, h, 0, dtype=torch.long, device=self.device)
        self.valid = torch.empty(b, 0, dtype=torch.bool, device=self.device)
        self.pads = torch.zeros(b, dtype=torch.long, device=self.device)
        self.state = {name: torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
                      for name in self.policy.state}
        if self.reindex and self.dtype in (torch.float16, torch.bfloat16):
            self.pre_keys = key_states.new_empty(b, h, 0, d)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.unobserved:
            raise UnobservedError(
                f"a {self.policy.name} cache layer got new tokens, but h2o's attention never saw the previous "
                "ones, so it could not evict: the model no longer runs h2o's attention (h2o.restore was called, "
                "the attention implementation was switched, or the cache is used with another model). Make a new "
                "cache with h2o.make_cache(model, ...) for the model you run.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, q, _ = key_states.shape
        arrival = torch.arange(self.seen, self.seen + q, device=self.device)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        if self.pre_keys is not None:  # filled in by `reposition`
            self.pre_keys = torch.cat([self.pre_keys, key_states], dim=-2)
        self.times = torch.cat([self.times, arrival.expand(b, h, q)], dim=-1)
        self.valid = torch.cat([self.valid, self.valid.new_ones(b, q)], dim=-1)
        if self.state:
            new = self.policy.initial_state(key_states, value_states)
            self.state = {name: torch.cat([t, new[name]], dim=-1) for name, t in self.state.items()}
        self.seen += q
        self.unobserved = True
        _pending.layer = self
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
        if self.reindex:
            query = self.reposition(query, position_ids)
        return query, self.attention_mask(q, causal_by_default), new_valid

    def observe(self, observation: Observation) -> bool:
        """After attention: the policy updates its state from what attention saw, then the layer evicts
        if it holds more than budget + buffer tokens. Returns whether it evicted."""
        self.policy.update(self.state, observation, self.seen)
        self.unobserved = False
        return self.evict_if_needed()

    def mark_padding(self, new_valid: torch.Tensor) -> None:
        """Record which of the tokens just appended are (left) padding: new_valid [B, q]."""
        q = new_valid.shape[-1]
        self.valid[:, -q:] = new_valid
        self.pads += (~new_valid).sum(-1)
        self.has_padding = self.has_padding or not bool(new_valid.all())

    def reposition(self, query: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """reindex mode: move the new keys and the queries from the model's positions to their slots."""
        q = query.shape[-2]
        kept = self.keys.shape[-2] - q
        if position_ids is None:  # what the model uses when it is given none
            position_ids = torch.arange(self.seen - q, self.seen, device=self.device)
        slots = torch.arange(kept, kept + q, device=self.device)
        delta = (slots - position_ids.to(self.device)).view(-1, 1, q)  # [B or 1, 1, q]
        inv_freq, dims = self.rope
        if self.pre_keys is not None:  # the new keys without RoPE, rounded once: what evictions re-rotate from
            position = position_ids.to(self.device).view(-1, 1, q)
            self.pre_keys[:, :, kept:] = rope_ops.rotate(self.keys[:, :, kept:], -position, inv_freq, dims)
        self.keys[:, :, kept:] = rope_ops.rotate(self.keys[:, :, kept:], delta, inv_freq, dims)
        return rope_ops.rotate(query, delta, inv_freq, dims)

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
        if self.keys.shape[-2] <= self.policy.budget + self.buffer:
            return False
        idx, kept = keep_indices(self.policy, self.state, self.times, self.valid, self.pads, self.seen, self.buffer,
                                 keys=self.keys, values=self.values)
        gather = lambda t: t.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
        self.values = gather(self.values)
        self.times = self.times.gather(2, idx)
        self.state = {name: t.gather(2, idx) for name, t in self.state.items()}
        self.valid = kept
        self.has_padding = not bool(kept.all())
        slots = torch.arange(idx.shape[-1], device=self.device)
        if self.pre_keys is not None:
            # half precision: rotate each kept key from its pre-RoPE copy straight to its new slot, so its error
            # stays at two roundings however many evictions it lives through (re-rotating the stored, rounded
            # key by each shift would add one rounding per eviction)
            self.pre_keys = gather(self.pre_keys)
            self.keys = rope_ops.rotate(self.pre_keys, slots.view(1, 1, -1), *self.rope)
        else:
            self.keys = gather(self.keys)
            if self.reindex:  # float32: one rotation by the shift adds ~1e-7 relative error per eviction
                self.keys = rope_ops.rotate(self.keys, slots - idx, *self.rope)
        return True

    # --- transformers' layer interface ------------------------------------------------------

    def get_seq_length(self) -> int:
        # Tokens seen, not kept: default position ids and the mask's query offset derive from it.
        return self.seen

    def get_mask_sizes(self, query) -> tuple[int, int]:
        # transformers 5.x passes the query length, 4.5x the cache_position tensor.
        q = query if isinstance(query, int) else query.shape[0]
        kept = self.keys.shape[-2] if self.is_initialized else 0
        return kept + q, self.seen - kept

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a compressed cache cannot be cropped (assisted decoding is not supported)")

    def slot_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the layer holds (keys, values, bookkeeping and state), by name."""
        named = {"keys": self.keys, "values": self.values, "times": self.times, "valid": self.valid, "pads": self.pads,
                 "pre_keys": self.pre_keys}
        named.update({f"state.{k}": v for k, v in self.state.items()})
        return {k: v for k, v in named.items() if isinstance(v, torch.Tensor)}

    def _select_rows(self, index: torch.Tensor) -> None:
        for name in ("keys", "values", "times", "valid", "pads", "pre_keys"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        self.state = {k: v.index_select(0, index.to(v.device)) for k, v in self.state.items()}

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


class CompressedCache(Cache):
    """A `Cache` of one layer per model layer; a `full` policy uses plain `DynamicLayer`s."""

    def __init__(self, policy: Policy, num_layers: int, positions: str = "original", buffer: int = 64,
                 rope: tuple | None = None):
        if policy.evicts:
            layers = [CompressedLayer(policy, buffer, positions == "reindex", rope) for _ in range(num_layers)]
        else:
            layers = [DynamicLayer() for _ in range(num_layers)]
        super().__init__(layers=layers)
        self.policy, self.positions, self.buffer = policy, positions, buffer

    def __repr__(self) -> str:
        return f"CompressedCache({self.policy.name}, positions={self.positions}, buffer={self.buffer})"

    def kept_lengths(self) -> list[int]:
        """Tokens each layer holds now."""
        return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
                for layer in self.layers]

    def kv_bytes(self) -> int:
        """Exact bytes held by the cache: keys, values and the per-slot bookkeeping."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, CompressedLayer):
                tensors = layer.slot_tensors().values()
            else:
                tensors = [t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                           if isinstance(t, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
