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

import torch
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer

from .attention import NAMES as H2O_ATTENTION
from .compressed_layer import CompressedLayer, UnobservedError  # noqa: F401 (UnobservedError: importable here, as before)
from .handover import take_pending  # noqa: F401 (take_pending: importable here, as before)
from .context_fit import ContextFit
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

            made = [StaticLayer(policy.at_layer(j), buffer) for j in range(len(compressed))]
        elif isinstance(policy, Allocated):  # head and layer budgets: one plan per compressed layer
            if kv_heads is None:
                raise ValueError(f"{policy.name}: an allocation needs the model's number of KV heads (kv_heads=)")
            plans = policy.plan(len(compressed), kv_heads, head_scores)
            # fixed plans of unequal budgets: fitted to a context shorter than the largest, row by row, so each row is
            # a layout of its own (h2o.context_fit)
            fitted = not policy.across_layers and fits(plans)
            made = [RowsLayer(plan, policy.rule.at_layer(j), buffer, reindex, rope) if fitted else
                    CompressedLayer(policy.rule.at_layer(j).with_budget(plan.groups[0][1]), buffer, reindex, rope,
                                    rule_budget=policy.rule.budget)
                    if plan.uniform and not policy.across_layers else
                    (RowsLayer if plan.joint else HeadGroupLayer)(plan, policy.rule.at_layer(j), buffer, reindex, rope)
                    for j, plan in enumerate(plans)]
            if policy.across_layers:  # one budget for every compressed layer: they evict together after each forward
                shared = SharedBudget(sum(plan.total for plan in plans), plans[0].floor, buffer)
                for layer in made:
                    shared.join(layer)
            if fitted:
                fit = ContextFit([(budget, len(heads)) for plan in plans for heads, budget in plan.groups])
                offset = 0
                for plan, layer in zip(plans, made):
                    layer.context_fit, layer.fit_offset = fit, offset
                    offset += len(plan.groups)
        elif policy.evicts:
            made = [CompressedLayer(policy.at_layer(j), buffer, reindex, rope) for j in range(len(compressed))]
        else:
            made = [DynamicLayer() for _ in compressed]
        it = iter(made)
        layers = [next(it) if w is None else SlidingWindowLayer(sliding_window=w) for w in windows]
        super().__init__(layers=layers)
        self.policy, self.positions, self.buffer, self.static = policy, positions, buffer, static
        self.windows = windows
        self.model_config = None  # the model's config, set by h2o.make_cache: each forward checks it (check_forward)
        # a replaying rule (KVzip): a forward held for its replay; whether the replay hooks ran in this forward; the
        # last tokens fed (the next replay's "starting with"); why the last replay did not finish
        self._held = self._armed = False
        self.replay_tail = self.interrupted = None

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
        if self.interrupted:
            raise RuntimeError(self.interrupted)
        if any(layer.held for layer in layers):
            raise RuntimeError(
                f"{self.policy.name}: the previous forward's tokens were never replayed, so this cache could not evict "
                "them (that forward raised or was interrupted before its replay, or the model ran without the replay "
                "hook h2o.make_cache installs). reset() the cache (or make a new one with h2o.make_cache(model, ..., "
                "tokenizer=)) before the next prompt")
        self._held = True
        for layer in layers + [layer for layer in self.layers if isinstance(layer, RowsLayer)]:
            layer.held = True  # a RowsLayer passes it to the rows it makes at its first forward

    def seen_tokens(self) -> int:
        """Tokens every compressed layer has seen (padding included; 0 before the first forward)."""
        layers = self.compressed_layers()
        return layers[0].seen if layers else 0

    @property
    def held(self) -> bool:
        return self._held

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
        """After the replay: every layer evicts as its forward would have (each its own, each head group of a layer
        with fixed groups its own, a layer's heads jointly, or the shared budget once); then every layer gives back
        the slots the replay's forwards grew its buffers by."""
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
            elif isinstance(layer, HeadGroupLayer) and layer.plan.joint:
                layer.observed()
            else:  # a uniform layer, or the groups of a layer with fixed head groups: each by its own budget
                for sub in getattr(layer, "sublayers", [layer]):
                    if isinstance(sub, CompressedLayer) and not sub.joint:
                        sub.evict_if_needed()
        for layer in self.compressed_layers():
            layer.fit()

    # --- compress once, ask many -----------------------------------------------------------------------------------

    def fork(self) -> CompressedCache:
        """A new cache holding this cache's context exactly as it is now (compressed, with every rule's state), for
        one answer: whatever runs on the fork (`generate`, a manual loop, more context) never changes this cache, so
        any number of questions can be answered from one compressed context, each from the same state.

        What is copied: each compressed layer's kept keys and values (its free slots are allocated, not copied) and
        its small per-slot bookkeeping; a full-cache or sliding-window layer's keys and values are shared, not copied
        (transformers' layers never write them in place: each update makes new tensors). The fork holds what this
        cache holds (`kv_bytes()`), less what they share. Refused, before anything is copied, for a cache in the middle
        of a forward or holding tokens its replay (KVzip) has not scored, and for an interrupted one."""
        check_forkable(self)
        memo = {id(x): x for x in (self.model_config, getattr(self, "replayer", None), self.replay_tail)
                if x is not None}
        for layer in self.layers:
            if not isinstance(layer, (CompressedLayer, HeadGroupLayer)):
                memo.update({id(t): t for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                             if isinstance(t, torch.Tensor)})
        return copy.deepcopy(self, memo)

    def evicted(self) -> bool:
        """Whether any head of any layer holds fewer tokens than it has seen."""
        return any(layer.length < layer.seen for layer in self.compressed_layers())

    def kv_bytes(self, bookkeeping: bool = True) -> int:
        """The bytes the cache keeps alive: every storage under a tensor it holds (keys, values and, with
        `bookkeeping`, the per-slot bookkeeping of every head), each storage once and whole. So a view keeps its whole
        buffer in the count (a compressed layer's buffers at their allocated capacity: up to buffer + 1 free slots
        per head after an eviction; a sliding-window layer's storage), and a tensor shared by two names counts once.
        True at every moment a caller can look: after a prompt, a chunk, a step, a replay, a reset. Not in it: what
        belongs to the model and is shared by every cache made for it, as the model's weights are (a kvzap rule's
        fitted surrogate, `h2o.score_surrogate.Surrogate`: `Surrogate.nbytes()`, a few MiB at most)."""
        return storage_bytes(t for name, t in self.held_tensors()
                             if bookkeeping or name.rpartition(".")[2] in ("keys", "values"))

    def held_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every tensor the cache's layers hold (views included: what keeps a storage alive)."""
        out = []
        for i, layer in enumerate(self.layers):
            out += _held(layer, str(i))
        tail = self.replay_tail  # a replaying rule's last tokens fed (its next replay's prompt)
        return out + ([("replay_tail", tail)] if tail is not None else [])

    # --- the cache as a whole ---------------------------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0 and not torch.compiler.is_compiling():
            self.check_forward()  # before any layer takes the forward's tokens
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def check_forward(self) -> None:
        """At a forward's first layer, before any layer takes its tokens: the model must still run what this cache
        needs to keep its bound (h2o's attention; a replaying rule's hooks), else nothing is written and it raises."""
        config = self.model_config
        if config is None or not self.policy.evicts:  # a cache made without a model, or one that never evicts
            return
        if config._attn_implementation not in H2O_ATTENTION.values():
            raise UnobservedError(
                f"this {self.policy.name} cache was given a forward of a model that runs "
                f"{config._attn_implementation!r} attention, not h2o's: it could not evict (h2o.restore(model) was "
                "called, the attention implementation was switched, or the cache is used with another model). "
                "Nothing was written to the cache. Make a new cache with h2o.make_cache(model, ...) for the model "
                "you run")
        if self.replays:
            armed, self._armed = self._armed, False
            if not armed:
                raise UnobservedError(
                    f"{self.policy.name} scores the context by replaying it, and the hooks h2o.make_cache installed "
                    "for that did not run in this forward (h2o.restore removed them, or the cache is used with another "
                    "model): its scores would stay zero. Nothing was written to the cache. Make a new cache with "
                    "h2o.make_cache(model, ..., tokenizer=) for the model you run")
        if self.interrupted:
            raise RuntimeError(self.interrupted)

    def reset(self) -> None:
        """Empty the cache for a new prompt (or a new batch size): every layer, the held state and the replay's
        memory of the last tokens fed, so it behaves as a new cache."""
        super().reset()
        for fit in {id(layer.context_fit): layer.context_fit for layer in self.layers
                    if getattr(layer, "context_fit", None) is not None}.values():
            fit.forget_rows()
        self._held = False
        self.replay_tail = None
        self.interrupted = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._rows_of_tail(lambda tail: tail.index_select(0, beam_idx.to(tail.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._rows_of_tail(lambda tail: tail[torch.as_tensor(indices, device=tail.device).flatten()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._rows_of_tail(lambda tail: tail.repeat_interleave(repeats, dim=0))

    def _rows_of_tail(self, take) -> None:
        """The replay's last tokens fed follow the cache's rows (beams, a selection), as the layers do."""
        if self.replay_tail is not None:
            self.replay_tail = take(self.replay_tail)

    def rows(self) -> int | None:
        """Rows (batch size) the cache holds now; None while empty."""
        for layer in self.layers:
            if isinstance(layer, RowsLayer):
                if layer.rows:
                    return len(layer.rows)
            elif isinstance(getattr(layer, "keys", None), torch.Tensor) and layer.keys.dim() == 4:
                return layer.keys.shape[0]
        return None


def check_forkable(cache: CompressedCache) -> None:
    """What `fork` cannot copy into a cache that would behave as this one: said before anything is copied."""
    name = cache.policy.name
    if cache.interrupted:
        raise RuntimeError(f"cannot fork this {name} cache: {cache.interrupted}")
    if cache.held or any(layer.held for layer in cache.compressed_layers()):
        raise RuntimeError(f"cannot fork this {name} cache: it holds a forward's tokens that its replay has not scored "
                           "yet (fork after the forward returns)")
    if any(layer.unobserved for layer in cache.compressed_layers()) or any(
            getattr(getattr(layer, "shared", None), "_reported", None) for layer in cache.layers):
        raise RuntimeError(f"cannot fork this {name} cache in the middle of a forward (a layer has taken tokens that "
                           "its attention has not observed: the forward raised, or the cache is being run): fork it "
                           "between forwards, or reset() it")


def fits(plans) -> bool:
    """Whether a plan's budgets are fitted to a short context (`h2o.context_fit`): fixed head groups (no joint split)
    of unequal budgets. A plan whose budgets are all equal holds what the uniform rule holds, as it is."""
    return not any(plan.joint for plan in plans) and len({b for plan in plans for _, b in plan.groups}) > 1


def storage_bytes(tensors) -> int:
    """The bytes of the storages under `tensors`: each storage once and whole (a view counts the buffer it keeps
    alive). The one measure of memory held: `CompressedCache.kv_bytes`, and the peers' caches in `h2o.eval.runners`."""
    counted, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.nbytes() and key not in counted:
            counted.add(key)
            total += storage.nbytes()
    return total


def reachable_storages(root) -> dict:
    """Every tensor storage reachable from `root` (a cache) through the attributes of h2o's and transformers' cache
    objects, dicts, lists and tuples: {(device, data_ptr): bytes}. A walk independent of `held_tensors` (which names
    what each layer kind holds), for checking that `kv_bytes()` leaves nothing out. It stops at what belongs to the
    model (an object whose class says `MODEL_SIDE`: a kvzap rule's fitted surrogate), shared by every cache of it."""
    found, seen, stack = {}, set(), [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or getattr(type(obj), "MODEL_SIDE", False):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found[(obj.device, obj.untyped_storage().data_ptr())] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif type(obj).__module__.startswith(("h2o.", "transformers.cache_utils")) and hasattr(obj, "__dict__"):
            stack += list(vars(obj).values())
    return found


class SlidingWindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer (the model bounds it: never evicted by a policy), holding only what it
    keeps. transformers' own keeps its last window - 1 tokens as a slice of the forward's concatenated keys, so after
    a prompt of n tokens the whole n stay alive until the next step; this one copies the kept tokens out of a larger
    storage (more than one token beyond them: a decode step's one extra slot is left as it is)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.keys, self.values = _own(self.keys), _own(self.values)
        return out


def _own(t: torch.Tensor) -> torch.Tensor:
    """t itself, or a copy of it if its storage holds more than one token beyond it."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        return t
    token = t.shape[0] * t.shape[1] * t.shape[-1] * t.element_size()
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() + token else t


def _tensors_in(value, depth: int = 3) -> list[torch.Tensor]:
    """The tensors in `value`: itself, or inside its dicts, lists and tuples (a few levels deep)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth and isinstance(value, dict):
        value = list(value.values())
    if depth and isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item, depth - 1)]
    return []


def _held(layer, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what one layer holds: its keys and values (a view keeps its storage alive), its buffers
    (`slot_tensors`), any other tensor it keeps (a head group's head indices, the RoPE frequencies of reindex,
    transformers' own small tensors), and the same of its rows and head groups."""
    out = [(f"{prefix}.{name}", t) for name in ("keys", "values")
           if isinstance(t := getattr(layer, name, None), torch.Tensor)]
    if hasattr(layer, "slot_tensors"):
        out += [(f"{prefix}.{name}", t) for name, t in layer.slot_tensors().items()]
    for name, value in vars(layer).items():
        if name not in ("keys", "values"):
            out += [(f"{prefix}.{name}.other", t) for t in _tensors_in(value)]
    for j, row in enumerate(getattr(layer, "rows", [])):
        out += _held(row, f"{prefix}.row{j}")
    if not hasattr(layer, "rows"):
        for j, sub in enumerate(getattr(layer, "sublayers", [])):
            out += _held(sub, f"{prefix}.{j}")
    return out


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
