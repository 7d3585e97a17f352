"""One interface over the caches the harness runs: our policies, and NVIDIA kvpress's presses side by side.

Every measuring loop (retrieval tasks, perplexity, TTFT/TPOT) drives a `Runner`: `forward(ids)` gives the
logits and keeps the cache, `check()` raises a `ValidityError` if the cache is not what the policy
promises, `kept_lengths()` and `kv_bytes()` say what it holds.

kvpress names (the `kvpress:` prefix says where a row comes from):

    kvpress:<press>@<ratio>            a prefill press at kvpress's compression_ratio (the share removed),
                                       e.g. kvpress:snapkv@0.8 keeps 20% of each prompt
    kvpress:<press>@<tokens>           the same press with its ratio set per prompt so that it keeps exactly
                                       <tokens> (an int), e.g. kvpress:snapkv@256: the kept tokens of h2o_4_32_256
    kvpress:decoding:<press>@<tokens>  kvpress's DecodingPress around <press>: back to <tokens> every
                                       --buffer + 1 tokens (our lazy eviction's cadence; `PressPolicy.make`)
    kvpress:adakv:<press>@<tokens>     kvpress's AdaKVPress around <press> (also @<ratio>): the prompt's budget
                                       split across each layer's KV heads by one top-k over the press's scores
                                       (floor: alpha_safeguard 0.2 of a head's share). kvpress SIMULATES head
                                       budgets: every prompt token stays in the cache and the evicted ones are
                                       masked in attention (a fake key no query attends), so no memory is freed
                                       and its KV MiB is the full prompt's
    kvpress:<press>                    (h2o tasks) sized like our families, to each --budget-ratio / --budgets

<press> is a kvpress press class in snake case without "Press": snapkv, tova, knorm, streaming_llm,
expected_attention, keydiff, ... (`press_names()` lists them).

How a press runs, through kvpress's public API as its pipeline does: a `DynamicCache`; the prompt's prefill
inside `with press(model)` (kvpress hooks transformers' attention layers and compresses the cache after the
prefill); every later forward outside it. kvpress's cache holds fewer tokens than were seen, so every
forward passes `position_ids` (the tokens' true positions), as its pipeline does. A decoding press stays
entered around every forward of its run (not across other runners' forwards). kvpress hooks the attention modules, not the attention function: a model that also
runs our caches (h2o's attention function registered) computes kvpress's layers with the stock attention,
which h2o's passes through for any cache that is not ours, so both kinds interleave in one process.

What compares: retrieval answers (question-aware: the prompt minus its last token is the prefill), TTFT,
TPOT and KV bytes. Perplexity does not for a prefill press (it compresses only the first forward, so every
later token is scored on a growing, uncompressed cache): `ppl_comparable` says so and the commands print
that instead of a number. A decoding press compresses throughout, so its perplexity is measured.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import importlib.util
import re
import weakref
from dataclasses import dataclass
from functools import lru_cache

import torch

import h2o
from h2o import models as h2o_models
from h2o.cache import storage_bytes
from h2o.policies import at_budget

PREFIX = "kvpress:"
KVPRESS_VERSION = "0.5.5"
_NAME = re.compile(r"kvpress:(?:(decoding|adakv):)?([a-z0-9_]+)(?:@([0-9.]+))?")


class ValidityError(RuntimeError):
    """A measurement that would not mean what it claims."""


def is_press(name: str) -> bool:
    return name.startswith(PREFIX)


# --- kvpress: installed, supported, its presses -----------------------------------------------------

def check_kvpress() -> None:
    """kvpress importable with a transformers it supports; a clear error (before any model loads) if not."""
    if importlib.util.find_spec("kvpress") is None:
        raise ValueError("kvpress is not installed: pip install 'h2o-kvcache[kvpress]' (kvpress "
                         f"{KVPRESS_VERSION}; it needs transformers >= 4.56, < 5.3: tox -e kvpress has that env)")
    import transformers
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wanted = next((r.split(";")[0].removeprefix("transformers").strip() for r in
                   importlib.metadata.requires("kvpress") or [] if re.match(r"transformers\b", r)), "")
    have = transformers.__version__
    if wanted and Version(have) not in SpecifierSet(wanted):
        raise ValueError(f"kvpress {importlib.metadata.version('kvpress')} supports transformers {wanted}, and "
                         f"transformers {have} is installed: use an environment with a supported one "
                         "(tox -e kvpress installs transformers 4.57.6)")


@lru_cache(maxsize=1)
def _press_classes() -> dict[str, type]:
    import kvpress

    out = {}
    for attr in dir(kvpress):
        cls = getattr(kvpress, attr)
        if isinstance(cls, type) and attr.endswith("Press") and issubclass(cls, kvpress.ScorerPress) \
                and cls is not kvpress.ScorerPress:
            out[_snake(attr.removesuffix("Press"))] = cls
    return out


def _snake(camel: str) -> str:
    """A press's name: SnapKV -> snapkv, StreamingLLM -> streaming_llm, ExpectedAttention -> expected_attention,
    TOVA -> tova, KeyDiff -> keydiff (our rule's spelling), LagKV -> lagkv."""
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", camel).lower().replace("_kv", "kv")
    return {"key_diff": "keydiff"}.get(name, name)


def _press_key(name: str) -> str | None:
    """The press a spelling means (underscores do not matter: snap_kv = snapkv), or None."""
    return next((k for k in _press_classes() if k.replace("_", "") == name.replace("_", "")), None)


def press_names() -> list[str]:
    """The kvpress presses usable by name (kvpress's score-based presses: they take a compression ratio)."""
    check_kvpress()
    return sorted(_press_classes())


@dataclass(frozen=True)
class PressPolicy:
    """A kvpress press as the harness runs it (see the module docstring for the names)."""

    press: str
    decoding: bool = False
    ratio: float | None = None  # kvpress's compression_ratio (prefill presses spelled @<ratio>)
    tokens: int | None = None  # kept tokens (@<tokens>; a decoding press's target size)
    adakv: bool = False  # kvpress's AdaKVPress around the press (head budgets by masking; nothing freed)

    evicts = True

    @property
    def name(self) -> str:
        size = "" if self.ratio is None and self.tokens is None else \
            f"@{self.ratio:g}" if self.ratio is not None else f"@{self.tokens}"
        wrapper = "decoding:" if self.decoding else "adakv:" if self.adakv else ""
        return f"{PREFIX}{wrapper}{self.press}{size}"

    @property
    def budget(self) -> int | None:
        """Tokens kept (None for a ratio: it depends on the prompt)."""
        return self.tokens

    @property
    def sized(self) -> bool:
        return self.ratio is not None or self.tokens is not None

    def at(self, tokens: int) -> "PressPolicy":
        """This press keeping `tokens` (a family-like name sized to a budget)."""
        return PressPolicy(self.press, self.decoding, None, tokens, self.adakv)

    def kept_after_prefill(self, prompt: int) -> int:
        """Tokens kvpress keeps of a `prompt`-token prefill (its compute_n_kept)."""
        from kvpress.utils import compute_n_kept

        return prompt if self.decoding else compute_n_kept(prompt, self.ratio_for(prompt))

    def ratio_for(self, prompt: int) -> float:
        """The compression ratio of a `prompt`-token prefill: the given one, or the one that keeps `tokens`."""
        if self.ratio is not None:
            return self.ratio
        if self.tokens >= prompt:
            return 0.0
        return 1.0 - (self.tokens + 0.5) / prompt  # int(prompt * (1 - ratio)) == tokens

    def make(self, prompt: int, buffer: int):
        """The kvpress press object for a first forward of `prompt` tokens. A decoding press compresses every
        `compression_interval` forwards: (buffer + 1) / prompt of them (rounded up), so that token by token it is
        every buffer + 1 tokens and with chunks about as often in tokens (our lazy eviction's cadence)."""
        cls = _press_classes()[self.press]
        if self.decoding:
            import kvpress

            interval = max(1, -(-(buffer + 1) // prompt))
            return kvpress.DecodingPress(base_press=cls(), compression_interval=interval, target_size=self.tokens)
        if self.adakv:
            import kvpress

            return kvpress.AdaKVPress(press=cls(compression_ratio=self.ratio_for(prompt)))
        return cls(compression_ratio=self.ratio_for(prompt))


def parse_press(name: str) -> PressPolicy:
    """The press `name` spells; clear errors for a bad name, a press kvpress lacks, or kvpress missing."""
    m = _NAME.fullmatch(name)
    if not m:
        raise ValueError(f"bad kvpress name {name!r}: use kvpress:<press>@<ratio in (0, 1)>, kvpress:<press>@<tokens>, "
                         "kvpress:decoding:<press>@<tokens>, kvpress:adakv:<press>@<tokens or ratio> or (h2o tasks) "
                         "kvpress:<press>")
    check_kvpress()
    decoding, adakv, press, size = m[1] == "decoding", m[1] == "adakv", _press_key(m[2]), m[3]
    if press is None:
        press = m[2]
        raise ValueError(f"kvpress has no press {press!r}; its score-based presses: {', '.join(press_names())}")
    ratio = tokens = None
    if size is not None:
        if "." in size:
            ratio = float(size)
            if not 0 < ratio < 1:
                raise ValueError(f"{name}: a compression ratio must lie in (0, 1), got {size}")
            if decoding:
                raise ValueError(f"{name}: a decoding press keeps a number of tokens (@<tokens>), not a ratio")
        else:
            tokens = int(size)
            if tokens < 1:
                raise ValueError(f"{name}: must keep at least 1 token, got {size}")
    elif decoding:
        raise ValueError(f"{name}: a decoding press needs its target size, kvpress:decoding:{press}@<tokens>")
    return PressPolicy(press, decoding, ratio, tokens, adakv)


# --- what every command asks of a policy name ----------------------------------------------------------

def describe(name: str, score: str | None = None):
    """The policy object of any name the harness takes: ours (`h2o.parse`) or a kvpress press."""
    return parse_press(name) if is_press(name) else h2o.parse(name, score)


def canonical(names: list[str], score: str | None = None) -> list[str]:
    """Canonical names: ours with their scoring rule spelled out (`h2o.resolve`), presses as they parse."""
    return [parse_press(n).name if is_press(n) else h2o.resolve([n], score)[0] for n in names]


def ppl_comparable(name: str) -> str | None:
    """None if the policy's perplexity can be measured like ours; else why it cannot."""
    if is_press(name) and not parse_press(name).decoding:
        return (f"{name}: a prefill press compresses only the first forward, so perplexity (scored over later "
                "forwards on a growing, uncompressed cache) would not measure it: not comparable, not measured")
    return None


# --- runners -------------------------------------------------------------------------------------------

_HEAD_SCORES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> () -> its head scores


def provide_head_scores(model, compute) -> None:
    """Where an allocation that ranks heads (retrieval_..., induction_..., ablation_..., headkv_...) gets `model`'s head
    scores: `compute(**options)`, called once per options, on first need (the session registers
    `h2o.eval.head_score_cache.scores_for`, which caches them on disk)."""
    _HEAD_SCORES[model] = [compute, {}]


def head_scores(model, name: str):
    entry = _HEAD_SCORES.get(model)
    if entry is None:
        raise ValueError(f"{name}: ranks KV heads by a head score, and none is known for this model "
                         "(h2o.eval.runners.provide_head_scores; the h2o commands provide them)")
    from .head_score_cache import ABLATION_CASES, RECONSTRUCTION_TOKENS

    needs = h2o.parse(name).allocation.score
    options = ({"ablation_cases": ABLATION_CASES} if needs == "ablation" else
               {"reconstruction_tokens": RECONSTRUCTION_TOKENS} if needs == "reconstruction" else {})
    key = tuple(sorted(options.items()))
    if key not in entry[1]:
        entry[1][key] = entry[0](**options)
    return entry[1][key]


_SURROGATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> [() -> its surrogate, cached]


def provide_surrogate(model, compute) -> None:
    """Where a kvzap rule gets `model`'s surrogate of KVzip's scores: `compute()`, called on first need (the session
    registers `h2o.eval.surrogate_cache.surrogate_for`, which caches it on disk)."""
    _SURROGATES[model] = [compute, None]


def surrogate_for(model, name: str):
    """The surrogate a kvzap rule (alone or under an allocation) ranks by; None for any other rule."""
    policy = h2o.parse(name)
    if not getattr(getattr(policy, "rule", policy), "needs_surrogate", False):
        return None
    entry = _SURROGATES.get(model)
    if entry is None:
        raise ValueError(f"{name}: ranks tokens by a surrogate of KVzip's scores, and none is known for this model "
                         "(h2o.eval.runners.provide_surrogate; the h2o commands provide it)")
    if entry[1] is None:
        entry[1] = entry[0]()
    return entry[1]


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> its tokenizer (or None)


def provide_tokenizer(model, tokenizer) -> None:
    """`model`'s tokenizer, for a rule that replays the context (KVzip's replay prompts); the commands provide it."""
    _TOKENIZERS[model] = tokenizer


def tokenizer_for(model, name: str):
    tokenizer = _TOKENIZERS.get(model)
    if tokenizer is None:
        raise ValueError(f"{name}: replays the context (KVzip), which needs the model's tokenizer, and this model has "
                         "none (a random-weight model: use a real model, e.g. --model smollm2-135m)")
    return tokenizer


class CacheRunner:
    """One of our policies: a `CompressedCache` (bound: each KV head's budget + buffer after every forward)."""

    def __init__(self, model, name: str, positions: str = "original", buffer: int = 64):
        policy = h2o.parse(name)
        scores = head_scores(model, name) if getattr(getattr(policy, "allocation", None), "score", None) else None
        tokenizer = tokenizer_for(model, name) if getattr(policy, "replays", False) else None
        self.model = model
        self.cache = h2o.make_cache(model, policy, positions=positions, buffer=buffer, head_scores=scores,
                                    tokenizer=tokenizer, surrogate=surrogate_for(model, name))
        self.policy = self.cache.policy
        self.name, self.evicts = self.policy.name, self.policy.evicts

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        return self.model(ids, past_key_values=self.cache, use_cache=True, logits_to_keep=logits_to_keep).logits

    def check(self) -> int:
        if self.evicts:
            for layer, (lengths, bounds) in enumerate(zip(self.cache.head_lengths(), self.cache.head_bounds())):
                for head, (n, bound) in enumerate(zip(lengths, bounds)):
                    if n > bound:
                        raise ValidityError(f"{self.name}: layer {layer} KV head {head} holds {n} tokens, above "
                                            f"budget + buffer = {bound}")
        return max(self.cache.kept_lengths())

    def compressed(self) -> bool:
        """Whether any head of any layer has evicted a token."""
        return self.evicts and self.cache.evicted()

    def kept_lengths(self) -> list[int]:
        return self.cache.kept_lengths()

    def kv_bytes(self) -> int:
        return self.cache.kv_bytes()

    def kept_share(self, positions: list[int]) -> list[float]:
        """Per layer the policy holds, the share of (KV head, position) it still holds over `positions` (token
        positions of the first row); sliding-window layers, which the model bounds itself, are not in it."""
        if not self.evicts:
            return [1.0] * len(self.cache.kept_lengths())  # the full cache's layers hold every token fed
        return [float(layer.kept_mask()[0][:, positions].float().mean())
                for layer, window in zip(self.cache.layers, self.cache.windows) if window is None]

    def budget_for(self, prompt: int) -> int | None:
        return self.policy.budget

    def fork(self) -> "CacheRunner":
        """A runner on `cache.fork()`: the context as this runner's cache holds it now; whatever runs on the fork
        never changes this runner's cache (h2o tasks' multi-question protocol: every question from its own fork)."""
        twin = copy.copy(self)
        twin.cache = self.cache.fork()
        return twin

    def close(self) -> None:
        pass


class PressRunner:
    """A kvpress press on a `DynamicCache`, run through kvpress's API (module docstring). `check` holds kvpress
    to what it promises: a prefill press keeps exactly compute_n_kept(prompt) tokens after the prefill, then one
    more per token fed; a decoding press never more than its target + one interval. It has no `fork` (kvpress's
    press state and hooks are not copied): h2o tasks refuses it under --protocol multi-question."""

    def __init__(self, model, name: str, positions: str = "original", buffer: int = 64):
        from transformers import DynamicCache

        if positions != "original":
            raise ValueError(f"{name}: kvpress presses keep the original positions (--positions original)")
        self.model, self.policy, self.buffer = model, parse_press(name), buffer
        self.name, self.evicts = self.policy.name, True
        self.cache, self.seen, self.longest = DynamicCache(), 0, 0
        self.press = None  # made at the first forward (a prefill press's ratio depends on the prompt length)
        self.expected = None  # a prefill press: tokens it must hold now
        self.decoding_state = None  # a decoding press's step counts and buffers between this runner's forwards
        if self.policy.adakv:
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            stock = h2o_models._STOCK.get(h2o_models._attn_implementation(model), h2o_models._attn_implementation(model))
            if stock != "sdpa" or "attention_patch" not in getattr(ALL_ATTENTION_FUNCTIONS["sdpa"], "__qualname__", ""):
                raise ValueError(f"{name}: kvpress's AdaKV masks through its patch of the sdpa attention function; "
                                 f"this model runs {stock!r} attention (use --attn sdpa) or kvpress's patch is absent")
            self.attention_modules = [m for m in model.modules()
                                      if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
            self.heads = h2o_models.kv_heads(model.config)
        self.prefill = None  # tokens of the first forward

    def forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        if not self.policy.adakv:
            return self._forward(ids, logits_to_keep)
        # AdaKV's masks act in kvpress's wrapper of the registered attention functions; h2o's own function
        # (set on the model by a cache of ours) calls the stock one directly, so this runner's forwards run on
        # the model's stock attention, and the model gets back what it had after each.
        current = h2o_models._attn_implementation(self.model)
        stock = h2o_models._STOCK.get(current, current)
        if stock != current:
            h2o_models._set_attn_implementation(self.model, stock)
        try:
            return self._forward(ids, logits_to_keep)
        finally:
            if stock != current:
                h2o_models._set_attn_implementation(self.model, current)

    def _forward(self, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        q = ids.shape[-1]
        positions = torch.arange(self.seen, self.seen + q, device=ids.device).unsqueeze(0)
        if self.seen == 0:
            self.prefill = q
            self.press = self.policy.make(q, self.buffer)
            self.expected = self.policy.kept_after_prefill(q)
        else:
            self.expected += q
        # kvpress's hooks act on every forward of the model while entered, whatever the cache: entered around this
        # runner's own forwards only (the prefill; every forward for a decoding press), so that runners
        # interleaved in one process never touch each other. A DecodingPress resets its step counts and hidden
        # state buffers on exit; they are carried over from one of this runner's forwards to the next.
        entered = self.seen == 0 or self.policy.decoding
        with self.press(self.model) if entered else contextlib.nullcontext():
            if self.policy.decoding and self.decoding_state is not None:
                self.press.hidden_states_buffer, self.press.layer_step_counts = self.decoding_state
            logits = self.model(ids, past_key_values=self.cache, use_cache=True, position_ids=positions,
                                logits_to_keep=logits_to_keep).logits
            if self.policy.decoding:
                self.decoding_state = self.press.hidden_states_buffer, self.press.layer_step_counts
        self.seen += q
        self.longest = max(self.longest, q)
        return logits

    def masked(self) -> list[int]:
        """AdaKV: the (row, KV head, token) triples each attention layer masks, counted per layer."""
        return [len(m.masked_key_indices[0]) if getattr(m, "masked_key_indices", None) is not None else 0
                for m in self.attention_modules]

    def check(self) -> int:
        kept = max(self.kept_lengths())
        if self.policy.adakv:
            # kvpress keeps every token and masks, per layer, heads x (prefill - compute_n_kept) of them
            want = self.heads * (self.prefill - self.policy.kept_after_prefill(self.prefill))
            if set(self.kept_lengths()) != {self.seen} or set(self.masked()) != {want}:
                raise ValidityError(f"{self.name}: layers hold {sorted(set(self.kept_lengths()))} tokens and mask "
                                    f"{sorted(set(self.masked()))} (row, head, token) entries; kvpress's AdaKV must "
                                    f"hold all {self.seen} and mask {want} in every layer")
            return kept
        if self.policy.decoding:
            bound = self.policy.tokens + self.buffer + 1 + self.longest  # one interval: buffer + 1 tokens, or a chunk
            if kept > bound:
                raise ValidityError(f"{self.name}: a layer holds {kept} tokens, above kvpress's target + one "
                                    f"interval = {bound}")
        elif set(self.kept_lengths()) != {self.expected}:
            raise ValidityError(f"{self.name}: layers hold {sorted(set(self.kept_lengths()))} tokens, kvpress's "
                                f"compute_n_kept says {self.expected}: the press did not compress as it should")
        return kept

    def compressed(self) -> bool:
        if self.policy.adakv:  # nothing leaves kvpress's cache: compressed = some key is masked
            return max(self.masked(), default=0) > 0
        return max(self.kept_lengths()) < self.seen

    def kept_lengths(self) -> list[int]:
        return [layer.keys.shape[-2] if getattr(layer, "keys", None) is not None and layer.keys.dim() == 4 else 0
                for layer in self.cache.layers]

    def kv_bytes(self) -> int:
        """The storages the press's cache keeps alive (each once, whole: `h2o.cache.storage_bytes`), as h2o's own."""
        return storage_bytes(t for layer in self.cache.layers for t in (getattr(layer, "keys", None),
                                                                        getattr(layer, "values", None))
                             if isinstance(t, torch.Tensor))

    def kept_share(self, positions: list[int]) -> None:
        return None  # a press's cache does not say which positions it kept (per layer: None)

    def budget_for(self, prompt: int) -> int:
        return self.policy.tokens if self.policy.decoding else self.policy.kept_after_prefill(prompt)

    def close(self) -> None:
        pass


def open_runner(model, name: str, positions: str = "original", buffer: int = 64):
    """The runner of policy `name`: a kvpress press (`kvpress:` names) or one of ours."""
    return (PressRunner if is_press(name) else CacheRunner)(model, name, positions=positions, buffer=buffer)


def policy_name(family: str, budget: int, score: str | None, recent_share: float = 0.125) -> str:
    """The family's policy at `budget` (h2o.policies.at_budget): streaming_4_{b-4}, h2o_4_{b//8}_{b}_{rule}, ...
    with a recent window of `recent_share` of the budget (at most what the 4 sinks leave)."""
    return at_budget(family, budget, score, recent=min(budget - 4, int(recent_share * budget))).name
