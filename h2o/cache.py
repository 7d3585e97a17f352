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

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .compressed_layer import CompressedLayer, UnobservedError  # noqa: F401 (UnobservedError: importable here, as before)
from .handover import take_pending  # noqa: F401 (take_pending: importable here, as before)
from .head_group_layer import HeadGroupLayer
from .policies import Policy
from .policies.allocation import Allocated, head_tables
from .rows_layer import RowsLayer
from .shared_budget import SharedBudget


class CompressedCache(Cache):
    """A `Cache` of one layer per model layer; a `full` policy uses plain `DynamicLayer`s."""

    def __init__(self, policy: Policy | Allocated, num_layers: int, positions: str = "original", buffer: int = 64,
                 rope: tuple | None = None, kv_heads: int | None = None, head_scores=None, static: bool = False,
                 windows: list[int | None] | None = None):
        reindex = positions == "reindex"
        # per model layer, its sliding window (transformers' own layer, which the model bounds: never evicted by a
        # policy) or None (a layer the policy compresses); a policy's budget is per compressed KV head
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers:
            raise ValueError(f"windows names {len(windows)} layers, the cache has {num_layers}")
        check_windows(policy, windows, positions, static)
        compressed = [i for i, w in enumerate(windows) if w is None]
        if head_scores is not None:  # checked whichever policy: malformed scores are an error, never ignored
            head_scores = head_tables(head_scores)
        if static:  # the compile-friendly layout (h2o.static)
            check_static(policy, positions)
            from .static import StaticLayer

            made = [StaticLayer(policy, buffer) for _ in compressed]
        elif isinstance(policy, Allocated):  # head and layer budgets: one plan per compressed layer
            if kv_heads is None:
                raise ValueError(f"{policy.name}: an allocation needs the model's number of KV heads (kv_heads=)")
            plans = policy.plan(len(compressed), kv_heads, head_scores)
            made = [CompressedLayer(policy.rule.with_budget(plan.groups[0][1]), buffer, reindex, rope,
                                    rule_budget=policy.rule.budget)
                    if plan.uniform and not policy.across_layers else
                    (RowsLayer if plan.joint else HeadGroupLayer)(plan, policy.rule, buffer, reindex, rope)
                    for plan in plans]
            if policy.across_layers:  # one budget for every compressed layer: they evict together after each forward
                shared = SharedBudget(sum(plan.total for plan in plans), plans[0].floor, buffer)
                for layer in made:
                    shared.join(layer)
        elif policy.evicts:
            made = [CompressedLayer(policy, buffer, reindex, rope) for _ in compressed]
        else:
            made = [DynamicLayer() for _ in compressed]
        it = iter(made)
        layers = [next(it) if w is None else DynamicSlidingWindowLayer(sliding_window=w) for w in windows]
        super().__init__(layers=layers)
        self.policy, self.positions, self.buffer, self.static = policy, positions, buffer, static
        self.windows = windows

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

    def policy_layers(self) -> list:
        """The layers the policy holds (one per full-attention model layer), without the sliding-window layers."""
        return [layer for layer, w in zip(self.layers, self.windows) if w is None]

    def kept_lengths(self) -> list[int]:
        """Tokens each layer the policy holds keeps now (its longest head's, where heads hold different numbers);
        sliding-window layers, which the model bounds itself, are not in it (`window_lengths`)."""
        return [_length(layer) for layer in self.policy_layers()]

    def window_lengths(self) -> list[int]:
        """Tokens each sliding-window layer holds now (at most its window - 1 after a forward)."""
        return [_length(layer) for layer, w in zip(self.layers, self.windows) if w is not None]

    def head_lengths(self) -> list[list[int]]:
        """Tokens each KV head of each layer the policy holds keeps now."""
        return [layer.head_lengths() if isinstance(layer, HeadGroupLayer) else [_length(layer)] * _heads(layer)
                for layer in self.policy_layers()]

    def head_bounds(self) -> list[list[int | None]]:
        """What each KV head of each layer the policy holds may keep after any forward (budget + buffer; None: a
        full cache's layer)."""
        return [layer.head_bounds() if isinstance(layer, HeadGroupLayer) else
                [layer.budget + layer.buffer if isinstance(layer, CompressedLayer) else None] * _heads(layer)
                for layer in self.policy_layers()]

    # --- a replaying policy (KVzip): the cache holds a forward's tokens until their replay has scored them --------

    @property
    def replays(self) -> bool:
        return bool(getattr(self.policy, "replays", False))

    def hold(self) -> None:
        """Before a forward of several tokens: no layer evicts until `release` (after the replay). A cache still
        holding the previous forward's tokens was never replayed: an error, never a cache that stops evicting."""
        layers = self.compressed_layers()
        if any(layer.held for layer in layers):
            raise RuntimeError(
                f"{self.policy.name}: the previous forward's tokens were never replayed, so this cache could not "
                "evict them (the model ran without the hooks h2o.make_cache installs: h2o.restore was called, or the "
                "cache is used with another model). Make a new cache with h2o.make_cache(model, ..., tokenizer=)")
        self._held = True
        for layer in layers + [layer for layer in self.layers if isinstance(layer, RowsLayer)]:
            layer.held = True  # a RowsLayer passes it to the rows it makes at its first forward

    def seen_tokens(self) -> int:
        """Tokens every compressed layer has seen (padding included)."""
        return self.compressed_layers()[0].seen

    @property
    def held(self) -> bool:
        return getattr(self, "_held", False)

    def replay_window(self, window: tuple[int, int] | None) -> None:
        """The arrival indices [start, stop) of the chunk the next forward (a replay) reconstructs; None after."""
        for layer in self.compressed_layers():
            layer.replay = window

    def window_state(self) -> list[tuple]:
        """What the sliding-window layers hold (their keys, values and tokens seen): a replay forward adds its own
        tokens to them as the model runs, and `restore_windows` takes them back out, so a replay leaves no trace."""
        return [(layer, layer.keys, layer.values, layer.cumulative_length)
                for layer, w in zip(self.layers, self.windows) if w is not None]

    @staticmethod
    def restore_windows(state: list[tuple]) -> None:
        for layer, keys, values, seen in state:
            layer.keys, layer.values, layer.cumulative_length = keys, values, seen

    @property
    def replaying(self) -> bool:
        layers = self.compressed_layers()
        return bool(layers) and layers[0].replay is not None

    def release(self) -> None:
        """After the replay: every layer evicts as its forward would have (each its own, a layer's heads jointly,
        or the shared budget once)."""
        self._held = False
        for layer in self.compressed_layers():
            layer.held, layer.replay = False, None
        for layer in self.layers:
            if isinstance(layer, RowsLayer):
                layer.held = False
        shared = set()
        for layer in self.layers:
            budget = getattr(layer, "shared", None)
            if budget is not None:
                if id(budget) not in shared:
                    shared.add(id(budget))
                    budget.evict()
            elif isinstance(layer, HeadGroupLayer):
                layer.observed()
            elif isinstance(layer, CompressedLayer) and not layer.joint:
                layer.evict_if_needed()

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


def reindex_refusal(windows: list[int | None]) -> str:
    """Why positions='reindex' is refused on a model with sliding-window layers (`windows`: per layer)."""
    return (f"positions='reindex' on a model with sliding-window layers ({sum(map(bool, windows))} of {len(windows)}): "
            "the model rotates every layer at the same position ids, and reindex would set them to the compressed "
            "layers' slots, which the sliding-window layers' keys do not share (Gemma also rotates the two kinds with "
            "different RoPE bases). Use positions='original'")


def check_windows(policy, windows: list[int | None], positions: str, static: bool) -> None:
    """What a cache with sliding-window layers (`windows`: per layer, its window or None) cannot serve."""
    n = sum(map(bool, windows))
    if n == len(windows):
        raise ValueError("every layer is a sliding-window layer: nothing for a policy to compress")
    if n and positions == "reindex" and policy.evicts:
        raise ValueError(reindex_refusal(windows))
    if n and static:
        raise ValueError(f"{policy.name}: the static (compile-friendly) cache holds every layer in one fixed layout; "
                         "a model with sliding-window layers needs static=False")


def check_static(policy, positions: str) -> None:
    """What the static (compile-friendly) layout holds: a uniform evicting rule with original positions."""
    if isinstance(policy, Allocated):
        raise ValueError(f"{policy.name}: head and layer budgets hold different numbers of tokens per head; the "
                         "static (compile-friendly) cache holds a uniform rule. Use static=False for allocations")
    if getattr(policy, "replays", False):
        raise ValueError(f"{policy.name}: the static (compile-friendly) cache holds a rule that evicts during the "
                         "forward; a replaying rule (KVzip) scores the context after it: use static=False")
    if not policy.evicts:
        raise ValueError("a static full cache is transformers' StaticCache (cache_implementation='static'); "
                         "static=True is for evicting rules")
    if positions != "original":
        raise ValueError("the static (compile-friendly) cache keeps original positions: its slots are not in "
                         "arrival order, so positions='reindex' (keys rotated by slot) needs static=False")


def _length(layer) -> int:
    if isinstance(layer, (CompressedLayer, HeadGroupLayer)):
        return layer.length
    keys = getattr(layer, "keys", None)
    return keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0


def _heads(layer) -> int:
    keys = getattr(layer, "keys", None)
    return keys.shape[1] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0
