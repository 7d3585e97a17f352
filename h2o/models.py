"""What differs per architecture, and the two entry points: `make_cache` and `restore`."""

from __future__ import annotations

import sys
import warnings

import torch

from . import attention
from .cache import CompressedCache, check_windows
from .replay import Replay
from .policies import Policy, parse
from .policies.allocation import Allocated

# Decoder-only families whose attention goes through transformers' attention registry and applies rotate-half RoPE
# before `cache.update`. Gemma 2 and 3 mix sliding-window layers (which the model bounds itself: the cache keeps
# transformers' own layer for them) with full-attention layers (which a policy compresses); each family is admitted
# because its layers pass the equivalence oracles (tests/test_equivalence.py).
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gpt_neox", "gemma2", "gemma3_text")
POSITION_MODES = ("original", "reindex")

# h2o's attention function -> the stock one it wraps: read off the model itself (so a deep copy of a
# switched model, or a model switched in another process, is handled alike).
_STOCK = {ours: stock for stock, ours in attention.NAMES.items()}


def _attn_implementation(model) -> str:
    return model.config._attn_implementation


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def rotary_embedding(model) -> tuple[torch.Tensor, int]:
    """(inverse frequencies, rotated dims per head) of the model's RoPE; error if it has none."""
    for name, module in model.named_modules():
        if name.endswith("rotary_emb") and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            rope_type = getattr(module, "rope_type", "default")
            if rope_type not in ("default", "linear", "llama3", "yarn"):
                # dynamic NTK and longrope change their frequencies with the sequence length after we read
                # them (longrope switches from short to long factors past its original context), so keys
                # re-rotated with the frequencies read here would be wrong
                raise ValueError(f"positions='reindex' needs RoPE frequencies that do not change with the sequence "
                                 f"length; {rope_type!r} RoPE changes them. Use positions='original'")
            inv_freq = module.inv_freq.detach().to(torch.float32).clone()
            return inv_freq, 2 * inv_freq.numel()
    raise ValueError(
        f"positions='reindex' needs a model with rotary position embeddings; "
        f"{model.config.model_type!r} has none. Use positions='original'."
    )


def head_dim(config) -> int:
    """Dimensions per attention head."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rotary_dims(config) -> int:
    """Dimensions per head that RoPE rotates (all, or the config's partial share: GPT-NeoX's rotary_pct), from the
    config alone (a hybrid model's two RoPE bases rotate the same dimensions)."""
    share = getattr(config, "partial_rotary_factor", None) or getattr(config, "rotary_pct", None)
    for params in (getattr(config, "rope_parameters", None), getattr(config, "rope_scaling", None)):
        if share is None and isinstance(params, dict):  # transformers 5: in the RoPE parameters, per layer type or not
            params = params.get("full_attention", params)
            share = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    dims = int(head_dim(config) * (share or 1.0))
    return dims - dims % 2


def layer_windows(config) -> list[int | None]:
    """Per model layer: its sliding window (a layer the model bounds itself), or None (full attention: the layers a
    policy compresses). Read from `config.layer_types` where the config has it, else from `sliding_window` (and
    `use_sliding_window`) for every layer; any other layer type is refused."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if not getattr(config, "use_sliding_window", True):
        window = None
    types = getattr(config, "layer_types", None)
    if types is None:
        return [window] * n
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"{config.model_type!r} model has layers of type {', '.join(unknown)}, which this library "
                         "does not handle (it handles full_attention and sliding_attention layers)")
    if len(types) != n:
        raise ValueError(f"config.layer_types names {len(types)} layers, the model has {n}")
    if "sliding_attention" in types and not window:
        raise ValueError("config.layer_types has sliding_attention layers but config.sliding_window is not set")
    return [window if t == "sliding_attention" else None for t in types]


def compressed_layers(config) -> list[int]:
    """The model layers a policy compresses (full attention); the others keep transformers' sliding-window layer."""
    return [i for i, w in enumerate(layer_windows(config)) if w is None]


def check_model(model) -> None:
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in SUPPORTED_FAMILIES:
        raise ValueError(f"model family {family!r} is not supported; supported: {', '.join(SUPPORTED_FAMILIES)}")
    if not compressed_layers(config):
        raise ValueError(
            f"every layer of this {family!r} model attends within a sliding window of {config.sliding_window} "
            "tokens, which the model bounds itself: there is no growing cache to compress. Load it with "
            "sliding_window=None to compress full attention")


def make_cache(model, policy: str | Policy, positions: str = "original", buffer: int = 64,
               score: str | None = None, head_scores=None, static: bool = False, tokenizer=None,
               surrogate=None) -> CompressedCache:
    """A `transformers` Cache applying `policy` to `model`, for `generate` or manual forward loops.

    policy: "full", "streaming_<sinks>_<window>", "h2o_<sinks>_<recent>_<budget>[_mean|_sum]".
    positions: "original" (keys keep their absolute positions) or "reindex" (positions are cache
        slots, keys re-rotated after eviction: StreamingLLM's shift, to stream past the trained context).
    buffer: lazy eviction; a layer is cut back to `budget` once it holds more than `budget + buffer`.
    score: H2O scoring rule, "mean" (default) or "sum" (the paper's).
    head_scores: `h2o.head_scores(model, ...)` (or a dict of name -> [layers, KV heads] table in [0, 1]), for the
        allocations that choose heads by a head score ("retrieval_<share>_<factor>+<rule>", "induction_...";
        `h2o.policies.allocation`); checked whenever given (`h2o.policies.allocation.head_tables`).
    static: the compile-friendly layout (`h2o.static`): decode steps of fixed shapes that `torch.compile` runs
        without recompiling (`model.generate(..., past_key_values=cache, compile_config=...)`), keeping the same
        tokens as the eager cache (chunks, left padding and a new batch size per cache included). A uniform rule
        and original positions.
    tokenizer: the model's tokenizer, which a replaying rule (KVzip: "kvzip_<sinks>_<recent>_<budget>[+<rule>]")
        needs for its replay prompts (`h2o.replay`); ignored by the others.
    surrogate: a fitted surrogate of KVzip's scores (`h2o.fit_surrogate(model, tokenizer, [text])`), which a kvzap rule
        ("kvzap_<sinks>_<recent>_<budget>[_mlp]", alone or under an allocation) ranks by; checked against the model's
        shape; refused for the other rules (it would be ignored).

    For evicting policies the model's attention implementation is switched to the matching
    ``h2o_*`` function, and with positions="reindex" a forward pre-hook on the base model passes slot
    positions, so the model's RoPE rotates new tokens at their slots; another refuses, before anything runs, a
    `generate` mode an evicting cache cannot serve (assisted decoding: `SERVED_MODES`). `restore(model)` undoes
    all of it; the model's code is not modified.
    """
    policy = parse(policy, score)
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 0:
        raise ValueError(f"buffer must be an int >= 0, got {buffer!r}")
    windows = layer_windows(model.config)
    if any(windows) and not all(windows):  # refused before RoPE is read (reindex); all-sliding: check_model says it
        check_windows(policy, windows, positions, static is True)
    rope = rotary_embedding(model) if positions == "reindex" else None
    check_model(model)
    policy = bind_surrogate(policy, surrogate, model, windows)
    # built first: a bad allocation (head scores missing or of another model) is refused before the model is touched
    if not isinstance(static, bool):
        raise TypeError(f"static must be a bool, got {static!r}")
    cache = CompressedCache(policy, model.config.num_hidden_layers, positions, buffer, rope,
                            kv_heads=kv_heads(model.config), head_scores=head_scores, static=static,
                            windows=windows)
    if cache.replays:
        if tokenizer is None:
            raise ValueError(f"{policy.name} scores the context by replaying it, which needs the model's tokenizer "
                             "for its replay prompts: h2o.make_cache(model, policy, tokenizer=tokenizer)")
        cache.replayer = Replay(tokenizer)
    if policy.evicts:
        cache.model_config = model.config  # each forward checks the model still runs h2o's attention (check_forward)
        current = _STOCK.get(_attn_implementation(model), _attn_implementation(model))
        if current not in attention.NAMES:
            raise ValueError(
                f"attention implementation {current!r} cannot give attention scores or per-slot masks; "
                f"load the model with attn_implementation='sdpa' or 'eager'"
            )
        attention.register()
        _set_attn_implementation(model, attention.NAMES[current])
        _install_hook(model, _generation_mode_hook)
        if positions == "reindex":
            _install_hook(model, _slot_positions_hook)
        if cache.replays:
            _install_hook(model, _replay_hold_hook)
            base = model.base_model
            if not [key for key, h in base._forward_hooks.items() if h is _replay_hook]:
                base.register_forward_hook(_replay_hook, with_kwargs=True)
    return cache


def bind_surrogate(policy, surrogate, model, windows):
    """`policy` with `surrogate` bound to the rule that needs one (a kvzap rule, alone or under an allocation), checked
    against the model's shape; a rule that needs one without it, or a surrogate given to a rule that does not read
    it, is a ValueError."""
    rule = policy.rule if isinstance(policy, Allocated) else policy
    needs = getattr(rule, "needs_surrogate", False)
    if not needs:
        if surrogate is not None:
            raise ValueError(f"{policy.name} does not rank by a surrogate of KVzip's scores: surrogate= would be ignored "
                             "(a kvzap rule reads it: kvzap_<sinks>_<recent>_<budget>[_mlp])")
        return policy
    if surrogate is None:
        raise ValueError(f"{policy.name} ranks tokens by a fitted surrogate of KVzip's scores: h2o.make_cache(model, "
                         f"{policy.name!r}, surrogate=h2o.fit_surrogate(model, tokenizer, [calibration_text]))")
    from .score_surrogate import Surrogate

    if not isinstance(surrogate, Surrogate):
        raise TypeError(f"surrogate must be an h2o.Surrogate (h2o.fit_surrogate, h2o.Surrogate.load), got "
                        f"{type(surrogate).__name__}")
    config = model.config
    surrogate.check(sum(w is None for w in windows), kv_heads(config), head_dim(config), rotary_dims(config))
    bound = rule.with_surrogate(surrogate)
    return Allocated(policy.allocation, bound) if isinstance(policy, Allocated) else bound


def _forward_tokens(cache, args, kwargs) -> torch.Tensor:
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor):
        ids = args[0]
    if ids is None:
        raise ValueError(f"{cache.policy.name} replays the context's token ids: pass input_ids, not inputs_embeds")
    return ids


def _replay_hold_hook(module, args, kwargs):
    """Forward pre-hook of the base model, for a replaying rule (KVzip): a forward of several tokens is held (no layer
    evicts) until its replay has scored it; what the replay cannot serve is refused before anything runs."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache) or not cache.replays:
        return None
    cache._armed = True  # the hooks run in this forward (CompressedCache.check_forward)
    if cache.replaying:
        return None
    ids = _forward_tokens(cache, args, kwargs)
    mask = kwargs.get("attention_mask")
    rows = cache.rows()
    if rows is not None and rows != ids.shape[0]:
        raise ValueError(f"this {cache.policy.name} cache holds {rows} rows and was given a forward of {ids.shape[0]}: "
                         "reset() it (or make a new cache) for a new batch")
    if ids.shape[1] > 1:
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()):
            raise ValueError(f"{cache.policy.name} replays rows without padding: run prompts of different lengths "
                             "one at a time")
        cache.hold()
        _warn_past_positions(cache, module.config, ids.shape[1])
    elif cache.held:
        cache.hold()  # raises: the previous forward was never replayed
    return None


def _warn_past_positions(cache, config, q: int) -> None:
    """A replay whose positions run past the model's trained context is said, once per cache: its scores come from
    positions the model never saw in training."""
    limit = getattr(config, "max_position_embeddings", None)
    reach = cache.seen_tokens() + q + cache.replayer.longest(q)
    if limit and reach > limit and not getattr(cache, "_warned_positions", False):
        cache._warned_positions = True
        warnings.warn(f"{cache.policy.name}: the replay of this forward runs to position {reach}, past the model's "
                      f"max_position_embeddings ({limit}): its scores come from positions the model was not trained "
                      "on", stacklevel=2)


def _replay_hook(module, args, kwargs, output):
    """Forward hook of the base model: after a held forward, replay its tokens (`h2o.replay`), then release."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache) or not cache.replays or cache.replaying:
        return None
    ids = _forward_tokens(cache, args, kwargs)
    tail = cache.replay_tail
    if cache.held:
        cache.replayer.run(module, cache, ids, tail)
    both = ids if tail is None else torch.cat([tail, ids], dim=1)
    overlap = cache.replayer.overlap  # the last tokens fed: the next replay's "starting with"
    # a copy: a slice would keep the whole forward's ids alive
    cache.replay_tail = both[:, both.shape[1] - overlap:].clone() if overlap else None
    return None


def kv_heads(config) -> int:
    """KV heads per layer (GPT-NeoX has no GQA: one per query head)."""
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _slot_positions_hook(module, args, kwargs):
    """Forward pre-hook of the base model: with a reindex cache, position ids in slot space, so the model's own
    RoPE rotates the new queries and keys at their slots once (instead of the cache moving them from the
    model's positions on every layer). Any positions the caller passed are replaced; in reindex mode the
    result never depended on them (a layer moved every token to its slot)."""
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, CompressedCache):
        return None
    tokens = kwargs.get("input_ids")
    if tokens is None:
        tokens = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("inputs_embeds")
    if tokens is None:
        return None
    positions = cache.slot_positions(tokens.shape[1], tokens.device)
    if positions is None:
        return None
    return args, {**kwargs, "position_ids": positions}


# the `generate` modes an evicting cache serves: one forward per step over the tokens kept so far. Assisted decoding
# (an assistant model, prompt lookup) crops unverified candidates back out of the cache, which an evicting cache
# cannot undo (the candidates' attention already ranked and evicted); the rest are Hub-only in transformers 5.x.
SERVED_MODES = ("greedy_search", "sample", "beam_search", "beam_sample")


def _generation_mode_hook(module, args, kwargs):
    """Forward pre-hook of the base model: a forward with a compressed cache inside a `generate` mode it cannot
    serve is refused before the model or the cache is touched (read from the calling `generate` frame, whose
    `generation_mode` every transformers line sets before its first forward)."""
    if not isinstance(kwargs.get("past_key_values"), CompressedCache) or torch.compiler.is_compiling():
        return None
    mode = _calling_generation_mode()
    if mode is not None and mode not in SERVED_MODES:
        raise ValueError(f"generate's {mode} mode is not supported with a compressed cache: it verifies candidate "
                         "tokens and crops the rejected ones back out of the cache, and an evicting cache has already "
                         "ranked and evicted with them in place. Run without assistant_model / "
                         f"prompt_lookup_num_tokens (served: {', '.join(SERVED_MODES)}), or with policy 'full'")
    return None


def _calling_generation_mode() -> str | None:
    """The generation mode of the innermost transformers `generate` call on this thread's stack, if any."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "_assisted_decoding":
            return "assisted_generation"
        if code.co_name == "generate" and frame.f_globals.get("__name__", "").startswith("transformers.generation"):
            mode = frame.f_locals.get("generation_mode")
            if mode is not None:
                return str(getattr(mode, "value", mode))
        frame = frame.f_back
    return None


def _hooks(module, hook) -> list:
    return [key for key, h in module._forward_pre_hooks.items() if h is hook]


def _install_hook(model, hook) -> None:
    base = model.base_model
    if not _hooks(base, hook):  # once per model (a deep copy carries it)
        base.register_forward_pre_hook(hook, with_kwargs=True)


def serves_h2o(model) -> bool:
    """Whether the model runs h2o's attention now (`make_cache` switched it and no `restore` since)."""
    return _attn_implementation(model) in _STOCK


def restore(model) -> None:
    """Give the model back its own attention implementation and remove h2o's forward pre-hooks (the generation
    mode check, the reindex positions, a replaying rule's hold and replay; a no-op if `make_cache` changed nothing)."""
    original = _STOCK.get(_attn_implementation(model))
    if original is not None:
        _set_attn_implementation(model, original)
    base = model.base_model
    for key in _hooks(base, _slot_positions_hook) + _hooks(base, _generation_mode_hook) + _hooks(base, _replay_hold_hook):
        del base._forward_pre_hooks[key]
        base._forward_pre_hooks_with_kwargs.pop(key, None)
    for key in [key for key, h in base._forward_hooks.items() if h is _replay_hook]:
        del base._forward_hooks[key]
        base._forward_hooks_with_kwargs.pop(key, None)
