"""Training-free head scores: which KV heads copy (induction, echo) and which retrieve (needle retrieval).

    scores = h2o.head_scores(model)                                  # induction and echo, from the model alone
    scores = h2o.head_scores(model, tokenizer, [book_text])          # + retrieval, from calibration needles
    scores.top("induction", 9)                                       # [(layer, kv_head), ...] best first
    h2o.make_cache(model, "retrieval_0.1_4+h2o_4_32_256", head_scores=scores)

Every score is a float32 tensor [num_layers, num_kv_heads] with values in [0, 1]. A KV head's score is the MAX
over the query heads of its GQA group (query head h reads KV head h // (num_attention_heads // num_kv_heads)):
a KV head is worth keeping whole when any of the queries that read it needs it.

induction, echo (RazorAttention, Tang et al. 2024)
    `repeats` sequences of `random_tokens` random token ids (a seeded torch.Generator; distinct ids drawn from
    [100, vocab - 100), special tokens excluded), each repeated twice: x_0..x_{R-1} x_0..x_{R-1}. For the query
    at position R + i of the second copy (token x_i): induction = the attention it puts on key i + 1 (the token
    that followed the previous occurrence of x_i), echo = the attention on key i (that previous occurrence).
    Averaged over the R queries of the second copy and over the repeats.
retrieval (Retrieval Head, Wu et al. 2024)
    `cases` calibration needles: a window of about `context_tokens` tokens of a text (`texts[c % len(texts)]`,
    at a seeded random offset), the needle "The secret code is <6-10 random digits>. Remember it." inserted
    at a sentence end near depth 0.1 .. 0.9 (spread evenly over the cases), then the question, in the
    tokenizer's chat template when it has one, then the answer "The secret code is <digits>" teacher-forced,
    all in ONE forward. For each answer token of the code that is copied from the needle (its id occurs at a
    needle position), a query head scores a hit when its attention argmax, at the query that predicts that
    token, is a needle position holding that token. retrieval = hits / copied tokens over all cases.

ablation (heads found by ablation, as in "Not all heads matter", Tang et al. 2024; opt-in: `ablation_cases`)
    The first `ablation_cases` calibration needle cases, each fed once as it is and once per KV head with that
    head (every query head of its group) restricted to its first `ABLATION_WINDOW[0]` keys and the last
    `ABLATION_WINDOW[1]` before each query (what a cache that evicted everything else from that head would
    leave it); the answer's log-probability, teacher-forced, is read each time. A head's drop = the mean over the
    cases of max(0, log p(answer) - log p(answer | head restricted)); ablation = drop / the largest drop of any
    head (0 everywhere if no restriction lowers it). Raw drops are kept in `method["ablation_drops"]`.

reconstruction (KVzip's context-independent head scores, Kim et al. 2025; opt-in: `reconstruction_tokens`)
    About `reconstruction_tokens` tokens of the calibration texts, in windows of at most `RECONSTRUCTION_WINDOW`
    (at seeded offsets, a window per text in turn, each after the BOS token where the tokenizer has one), each
    fed once into a KVzip cache that holds the whole window (`kvzip_4_0_<window>`: this library's own replay,
    `h2o.replay`): every context key gets its KVzip score, the largest probability any replay query of its group
    gives it while the model repeats the window. A KV head's score = the MEAN of its keys' scores (the 4 sinks
    excluded, as KVzip excludes its system prompt), averaged over the windows: a head that the reconstruction
    reads all over the context (a copying head, which needs the whole context) scores high, one that reads its
    sinks and neighbours scores near 0. The mean, not the max over keys: on SmolLM2 the max saturates near 1 in
    about a third of the heads on one 1,024-token window and separates none of them. What DuoAttention-style
    allocation ranks heads by (`reconstruction_<share>_<factor>+<rule>`, `h2o.policies.allocation`): the chosen
    heads keep the whole context up to <factor> x budget, the rest the rule's few tokens; no replay at run time.

The attention probabilities come from a probe attention function registered with transformers (the model's
own eager attention, per layer, reduced at once: no layer's [heads, queries, keys] map outlives its layer);
the model's attention implementation and train/eval mode are restored afterwards. No gradients, no cache.
The pure reductions (`induction_echo_from_attention`, `retrieval_hits`, `group_max`) are exposed for tests.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
import transformers

from .models import compressed_layers
from .policies.allocation import head_tables

FORMAT = "h2o-head-scores"
FORMAT_VERSION = 1
ALGORITHM = 1  # bump when a score's definition changes: cached scores with another value are recomputed
NAMES = ("induction", "echo", "retrieval", "ablation", "reconstruction")
RECONSTRUCTION_WINDOW = 1024  # tokens per replayed calibration window (two replay chunks of `h2o.replay.CHUNK`)
RECONSTRUCTION_SINKS = 4  # the first keys of a window, excluded from its heads' means
ABLATION_WINDOW = (4, 32)  # (sinks, recent) an ablated head keeps: h2o_4_32_256's
PROBE = "h2o_head_probe"

INSTRUCTION = ("There is a secret code hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the secret code.")
QUESTION = "What is the secret code?"
NEEDLE = "The secret code is {code}. Remember it."
OPENING = "The secret code is"
_MARK = "\x00HAYSTACK\x00"


# --- the result ------------------------------------------------------------------------------------

@dataclass
class HeadScores:
    """Per-KV-head scores (float32 [num_layers, num_kv_heads], values in [0, 1]) and how they were made."""

    scores: dict[str, torch.Tensor]
    method: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.scores, dict) and not self.scores:
            raise ValueError("HeadScores needs at least one score")
        self.scores = head_tables(self.scores)  # a new dict: the caller's tables are not changed
        if not isinstance(self.method, dict):
            raise TypeError(f"HeadScores.method must be a dict, got {type(self.method).__name__}")

    @property
    def shape(self) -> tuple[int, int]:
        """(num_layers, num_kv_heads)."""
        return tuple(next(iter(self.scores.values())).shape)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._table(name)

    def __contains__(self, name: str) -> bool:
        return name in self.scores

    def ranked(self, name: str) -> list[tuple[int, int, float]]:
        """Every (layer, kv_head, score), best first; ties in layer-major order (as `h2o.policies.allocation`)."""
        table = self._table(name)
        heads = table.shape[1]
        order = torch.argsort(table.flatten().to(torch.float64), descending=True, stable=True)
        return [(int(i) // heads, int(i) % heads, float(table.flatten()[i])) for i in order]

    def top(self, name: str, k: int) -> list[tuple[int, int]]:
        """The k best (layer, kv_head) by score `name`."""
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        return [(layer, head) for layer, head, _ in self.ranked(name)[:k]]

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": FORMAT_VERSION, "shape": list(self.shape),
                "scores": {name: table.tolist() for name, table in self.scores.items()},
                "method": self.method}

    @classmethod
    def from_json(cls, d: dict) -> "HeadScores":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a head-scores record (format {d.get('format') if isinstance(d, dict) else None!r}, "
                             f"expected {FORMAT!r})")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"head-scores record version {d.get('version')!r}, this h2o reads {FORMAT_VERSION}")
        if not isinstance(d.get("scores"), dict):
            raise ValueError("a head-scores record needs 'scores': {name: [[score per KV head] per layer]}")
        out = cls(dict(d["scores"]), dict(d.get("method") or {}))
        if list(out.shape) != list(d.get("shape", out.shape)):
            raise ValueError(f"head-scores record says shape {d['shape']}, its tables are {list(out.shape)}")
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the JSON atomically (a temporary file beside it, then os.replace)."""
        from .files import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HeadScores":
        return cls.from_json(json.loads(Path(path).read_text()))

    def _table(self, name: str) -> torch.Tensor:
        if name not in self.scores:
            raise KeyError(f"no head score {name!r}; these scores have {', '.join(self.scores)}")
        return self.scores[name]


# --- the pure reductions ---------------------------------------------------------------------------

def induction_echo_from_attention(probs: torch.Tensor, repeat: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction, echo), each [..., heads], from attention probabilities [..., heads, queries, keys] of a sequence
    whose positions start .. start + 2*repeat - 1 hold `repeat` tokens and then the same tokens again.

    For the query at start + repeat + i: echo = its attention on key start + i (the previous occurrence of its
    token), induction = on key start + i + 1 (the token that followed it); both averaged over i = 0..repeat-1.
    """
    if repeat < 1 or probs.shape[-2] < start + 2 * repeat or probs.shape[-1] < start + 2 * repeat:
        raise ValueError(f"attention of shape {tuple(probs.shape)} does not hold 2 x {repeat} positions from {start}")
    i = torch.arange(repeat, device=probs.device)
    queries = start + repeat + i
    echo = probs[..., queries, start + i].float().mean(-1)
    induction = probs[..., queries, start + i + 1].float().mean(-1)
    return induction, echo


def retrieval_hits(probs: torch.Tensor, queries: Sequence[int] | torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hits per head [heads] (int64): for each of the n `queries` (positions), whether the head's attention argmax
    over keys is a target key of that query; `targets` is bool [n, keys]. probs: [heads, queries, keys]."""
    queries = torch.as_tensor(queries, dtype=torch.long, device=probs.device)
    targets = targets.to(device=probs.device, dtype=torch.bool)
    if targets.shape != (queries.numel(), probs.shape[-1]):
        raise ValueError(f"targets must be [{queries.numel()}, {probs.shape[-1]}], got {tuple(targets.shape)}")
    top = probs[:, queries, :].argmax(-1)  # [heads, n]
    return targets[torch.arange(queries.numel(), device=probs.device), top].sum(-1)


def copied_targets(ids: Sequence[int], needle: range, answer: range) -> tuple[list[int], torch.Tensor]:
    """For a teacher-forced sequence `ids`: (the query positions that predict each answer token copied from the
    needle, and bool [n, len(ids)] marking the needle positions holding that token). An answer token is copied
    when its id occurs at a needle position; the query that predicts the token at position p is p - 1."""
    queries, rows = [], []
    for p in answer:
        holding = [n for n in needle if ids[n] == ids[p]]
        if holding:
            row = torch.zeros(len(ids), dtype=torch.bool)
            row[holding] = True
            queries.append(p - 1)
            rows.append(row)
    return queries, torch.stack(rows) if rows else torch.zeros(0, len(ids), dtype=torch.bool)


def group_max(per_query_head: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[..., query heads] -> [..., kv heads]: the max over the query heads of each GQA group."""
    q_heads = per_query_head.shape[-1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not split into {kv_heads} KV heads")
    return per_query_head.unflatten(-1, (kv_heads, q_heads // kv_heads)).amax(-1)


def reconstruction_means(key_scores: torch.Tensor, times: torch.Tensor, sinks: int) -> torch.Tensor:
    """[..., kv heads] the mean KVzip score of each head's keys, those that arrived before `sinks` excluded:
    key_scores [..., kv heads, keys] (each key's largest replay attention), times [..., kv heads, keys] (its
    arrival index)."""
    if key_scores.shape != times.shape:
        raise ValueError(f"key scores {tuple(key_scores.shape)} and arrival times {tuple(times.shape)} differ")
    counted = times >= sinks
    if not bool(counted.any(-1).all()):
        raise ValueError(f"a head holds no key past the first {sinks} (sinks): nothing to average")
    return (key_scores.float() * counted).sum(-1) / counted.sum(-1)


def reconstruction_windows(tokenizer, texts: Sequence[str], tokens: int, seed: int = 0,
                           min_windows: int = 1) -> list[list[int]]:
    """About `tokens` tokens of `texts` in equal windows of at most `RECONSTRUCTION_WINDOW` (one text per window in turn,
    each window at a seeded random offset; a text shorter than a window is taken whole), each after the BOS token
    where the tokenizer has one; at least `min_windows` of them."""
    if tokens < 1:
        raise ValueError(f"reconstruction_tokens must be >= 1, got {tokens}")
    count = max(min_windows, math.ceil(tokens / RECONSTRUCTION_WINDOW))
    width = math.ceil(tokens / count)  # equal windows: 2,500 tokens are 3 windows of 834
    encoded = [_encode(tokenizer, text) for text in texts]
    bos = getattr(tokenizer, "bos_token_id", None)
    rng = random.Random(seed)
    out = []
    for i in range(count):
        ids = encoded[i % len(encoded)]
        if len(ids) < RECONSTRUCTION_SINKS + 2:
            raise ValueError(f"calibration text {i % len(encoded)} has {len(ids)} tokens: too short to replay")
        start = rng.randrange(0, len(ids) - width + 1) if len(ids) > width else 0
        out.append(([bos] if bos is not None else []) + ids[start:start + width])
    return out


def replayed_windows(model, tokenizer, windows: Sequence[Sequence[int]], progress=None):
    """Per window (token id lists), the compressed layers of a KVzip cache fed that window once and holding it whole
    (`kvzip_<RECONSTRUCTION_SINKS>_0_<window>`): every key scored by the replay, none evicted, slots in arrival order.
    A generator; the model's attention implementation and hooks are as they were once it ends (unless it already
    served h2o caches, which it still does). progress: `.update(1)` after each window."""
    from . import models  # here: h2o.models imports this module's neighbours

    device = model.get_input_embeddings().weight.device
    served = models.serves_h2o(model)
    try:
        for ids in windows:
            cache = models.make_cache(model, f"kvzip_{RECONSTRUCTION_SINKS}_0_{len(ids)}", buffer=0,
                                      tokenizer=tokenizer)
            with torch.no_grad():
                model(torch.tensor([list(ids)], device=device), past_key_values=cache, use_cache=True)
            layers = cache.compressed_layers()
            if any(layer.length != len(ids) for layer in layers):  # never: the cache holds the window whole
                raise RuntimeError("the reconstruction cache evicted part of its window")
            yield layers
            del cache, layers
            if progress is not None:
                progress.update(1)
    finally:
        if not served:
            models.restore(model)


def reconstruction_scores(model, tokenizer, windows: Sequence[Sequence[int]], progress=None) -> torch.Tensor:
    """[compressed layers, kv heads] float32: each KV head's mean KVzip score over `windows` (token id lists), each
    window replayed whole (`replayed_windows`)."""
    total = None
    for layers in replayed_windows(model, tokenizer, windows, progress):
        means = torch.stack([reconstruction_means(layer.state["score"][0], layer.times[0], RECONSTRUCTION_SINKS)
                             for layer in layers]).cpu()
        total = means if total is None else total + means
    return (total / len(windows)).float().clamp(0, 1)


# --- calibration needles ---------------------------------------------------------------------------

@dataclass
class NeedleCase:
    """One teacher-forced retrieval case: prompt + answer ids, and where the needle and the answer lie."""

    ids: list[int]
    needle: range  # positions of the needle sentence
    answer: range  # positions of the teacher-forced answer's code tokens (the last tokens of ids)
    code: str
    depth: float  # the asked depth (0.1 .. 0.9)
    at: float  # where the needle went: the share of the window's tokens before it
    context_tokens: int


def needle_cases(tokenizer, texts: Sequence[str], cases: int, context_tokens: int, seed: int = 0) -> list[NeedleCase]:
    """The calibration cases of `head_scores` (deterministic given the seed)."""
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("texts must be a non-empty list of non-empty strings (the haystacks)")
    rng = random.Random(f"h2o-heads-{seed}")
    per_text = math.ceil(cases / len(texts))
    haystacks = [_haystack_ids(tokenizer, text, context_tokens, per_text) for text in texts]
    prefix, suffix = _frame(tokenizer)
    out = []
    for c in range(cases):
        ids = haystacks[c % len(texts)]
        start = rng.randrange(len(ids) - context_tokens + 1)
        window = ids[start:start + context_tokens]
        depth = 0.5 if cases == 1 else 0.1 + 0.8 * c / (cases - 1)
        cut = _sentence_end(tokenizer, window, round(depth * len(window)))
        code = str(rng.randrange(1, 10)) + "".join(str(rng.randrange(10)) for _ in range(rng.randrange(5, 10)))
        sentence = NEEDLE.format(code=code)
        needle_ids = _encode(tokenizer, " " + sentence)
        answer_text = OPENING + " " + code
        answer_ids, (a0, a1) = _encode_span(tokenizer, answer_text, len(OPENING) + 1, len(answer_text))
        head = prefix + window[:cut]
        full = head + needle_ids + window[cut:] + suffix + answer_ids
        answer_start = len(full) - len(answer_ids)
        out.append(NeedleCase(ids=full, needle=range(len(head), len(head) + len(needle_ids)),
                              answer=range(answer_start + a0, answer_start + a1), code=code, depth=depth,
                              at=cut / len(window),
                              context_tokens=len(window) + len(needle_ids)))
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _encode_span(tokenizer, text: str, start: int, end: int) -> tuple[list[int], tuple[int, int]]:
    """ids of text and the token range [a, b) covering its characters [start, end)."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        inside = [t for t, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]
        if inside:
            return list(enc["input_ids"]), (inside[0], inside[-1] + 1)
    pieces = [_encode(tokenizer, p) if p else [] for p in (text[:start], text[start:end], text[end:])]
    return pieces[0] + pieces[1] + pieces[2], (len(pieces[0]), len(pieces[0]) + len(pieces[1]))


def _haystack_ids(tokenizer, text: str, context_tokens: int, windows: int) -> list[int]:
    """Enough of the text's ids to draw `windows` windows of context_tokens from (a prefix, widened as needed)."""
    want = context_tokens * max(2, windows + 1)
    chars = 6 * want
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= want or chars >= len(text):
            break
        chars *= 2
    if len(ids) < context_tokens:
        raise ValueError(f"a calibration text has {len(ids)} tokens, fewer than the {context_tokens} context tokens "
                         "asked for")
    return ids


def _sentence_end(tokenizer, window: list[int], cut: int, reach: int = 64) -> int:
    """The boundary nearest `cut` (within `reach` tokens) right after a token that ends a sentence (. ! ? and
    closing quotes or brackets after them); else the nearest before a token that starts a word; else `cut`."""
    def nearest(ok):
        near = [b for b in range(max(1, cut - reach), min(len(window) - 1, cut + reach) + 1) if ok(b)]
        return min(near, key=lambda b: (abs(b - cut), b)) if near else None

    ends = nearest(lambda b: tokenizer.decode([window[b - 1]]).strip().rstrip("\"')]’”").endswith((".", "!", "?")))
    if ends is not None:
        return ends
    words = nearest(lambda b: tokenizer.decode([window[b]])[:1].isspace())
    return cut if words is None else words


def _frame(tokenizer) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids) around the haystack: the chat template split at a marker, or a plain prompt."""
    if getattr(tokenizer, "chat_template", None):
        content = INSTRUCTION + "\n\n" + _MARK + "\n\n" + QUESTION
        text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        before, after = text.split(_MARK)
    else:
        before, after = INSTRUCTION + "\n\n", "\n\n" + QUESTION + "\n"
    return _encode(tokenizer, before), _encode(tokenizer, after)


# --- the probe ---------------------------------------------------------------------------------------

_collectors: list["_Collector"] = []


class _Collector:
    """Receives each layer's attention probabilities during one forward and reduces them at once."""

    def __init__(self, reduce: Callable[[int, torch.Tensor], None]):
        self.reduce, self.calls = reduce, 0

    def __call__(self, module, probs: torch.Tensor) -> None:
        layer = getattr(module, "layer_idx", None)
        self.reduce(self.calls if layer is None else int(layer), probs)
        self.calls += 1


def _stock_eager(module) -> Callable:
    """The model's own eager attention (its modeling module's `eager_attention_forward`), else a plain one."""
    return getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None) or _eager


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask[..., : key.shape[-2]]
    probs = logits.softmax(-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


_restricted: dict = {}  # the ablation's restricted head: {"layer", "heads": (first, stop) query heads, "window"}


def restrict_mask(attention_mask, query, key, heads: tuple[int, int], window: tuple[int, int]):
    """The eager additive mask [B, Hq, q, k] with query heads heads[0]..heads[1]-1 seeing only the first window[0]
    keys and the last window[1] keys before each query (the rest of the causal mask as given)."""
    b, hq, q, _ = query.shape
    k = key.shape[-2]
    rows = torch.arange(q, device=query.device).unsqueeze(1) + (k - q)
    cols = torch.arange(k, device=query.device).unsqueeze(0)
    keep = (cols < window[0]) | (rows - cols < window[1])
    if attention_mask is None:
        attention_mask = torch.zeros(b, 1, q, k, dtype=query.dtype, device=query.device).masked_fill_(
            cols > rows, torch.finfo(query.dtype).min)
    mask = attention_mask[..., :k].expand(b, hq, q, k).clone()
    mask[:, heads[0]:heads[1]] = mask[:, heads[0]:heads[1]].masked_fill(~keep, torch.finfo(mask.dtype).min)
    return mask


def _probe_attention(module, query, key, value, attention_mask, *args, **kwargs):
    if _restricted and getattr(module, "layer_idx", None) == _restricted["layer"]:
        attention_mask = restrict_mask(attention_mask, query, key, _restricted["heads"], _restricted["window"])
    out, probs = _stock_eager(module)(module, query, key, value, attention_mask, *args, **kwargs)
    if _collectors:
        _collectors[-1](module, probs)
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PROBE, _probe_attention)
    AttentionMaskInterface.register(PROBE, eager_mask)


def _configs(model) -> list:
    """Every distinct config object of the model (its own, its submodules', their sub-configs)."""
    found, queue = {}, [model.config] + [getattr(m, "config", None) for m in model.modules()]
    while queue:
        config = queue.pop()
        if isinstance(config, transformers.PretrainedConfig) and id(config) not in found:
            found[id(config)] = config
            queue.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return list(found.values())


def _attr(config) -> str:
    return "_attn_implementation_internal" if hasattr(config, "_attn_implementation_internal") else "_attn_implementation"


@contextmanager
def probed(model):
    """The model with the probe attention in every layer, in eval mode; restored exactly on exit."""
    _register()
    saved = [(config, _attr(config), getattr(config, _attr(config))) for config in _configs(model)]
    training = model.training
    try:
        for config, attr, _ in saved:
            setattr(config, attr, PROBE)
        model.eval()
        yield
    finally:
        for config, attr, value in saved:
            setattr(config, attr, value)
        model.train(training)


def _forward(model, ids: list[int] | torch.Tensor, reduce: Callable[[int, torch.Tensor], None], layers: int,
             **kwargs):
    collector = _Collector(reduce)
    _collectors.append(collector)
    try:
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(model.get_input_embeddings().weight.device)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=False, **kwargs)
    finally:
        _collectors.pop()
    if collector.calls != layers:
        raise RuntimeError(f"the probe saw {collector.calls} attention calls in a forward of a {layers}-layer model: "
                           f"{type(model).__name__} does not run its attention through transformers' "
                           "AttentionInterface, so its attention probabilities cannot be read")
    return out


# --- the scores ------------------------------------------------------------------------------------

def answer_logprob(model, case, layers: int, trims: bool) -> float:
    """log p(the case's answer tokens | the prompt), teacher-forced, under the probe (and any restriction)."""
    keep = len(case.ids) - case.answer.start + 1
    out = _forward(model, case.ids, lambda layer, probs: None, layers, **({"logits_to_keep": keep} if trims else {}))
    logp = out.logits[0, -keep:-1].float().log_softmax(-1)[: len(case.answer)]
    targets = torch.tensor(case.ids[case.answer.start:case.answer.stop], device=logp.device)
    return float(logp.gather(-1, targets.unsqueeze(-1)).sum())


def ablation_drops(model, cases, layers: int, q_heads: int, kv_heads: int, trims: bool, progress=None,
                   ablated: Sequence[int] | None = None) -> torch.Tensor:
    """[len(ablated), KV heads] float64: the mean over `cases` of the answer's log-probability drop when that KV head
    of each `ablated` layer (default: all `layers`) keeps only its `ABLATION_WINDOW` (clamped at 0). Runs under
    `probed(model)`."""
    group = q_heads // kv_heads
    ablated = list(range(layers)) if ablated is None else list(ablated)
    drops = torch.zeros(len(ablated), kv_heads, dtype=torch.float64)
    for case in cases:
        base = answer_logprob(model, case, layers, trims)
        for row, layer in enumerate(ablated):
            for h in range(kv_heads):
                _restricted.update(layer=layer, heads=(h * group, (h + 1) * group), window=ABLATION_WINDOW)
                try:
                    drops[row, h] += max(0.0, base - answer_logprob(model, case, layers, trims))
                finally:
                    _restricted.clear()
                if progress is not None:
                    progress.update(1)
    return drops / max(1, len(cases))


def shape_of(config) -> tuple[int, int, int]:
    """(layers, query heads, KV heads) of a model config (GPT-NeoX has no num_key_value_heads: one per head)."""
    q_heads = config.num_attention_heads
    return config.num_hidden_layers, q_heads, getattr(config, "num_key_value_heads", None) or q_heads


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


_VOLATILE = {"_name_or_path", "name_or_path", "_attn_implementation", "_attn_implementation_internal",
             "attn_implementation", "transformers_version", "torch_dtype", "dtype", "_commit_hash",
             "output_attentions", "output_hidden_states", "use_cache", "_experts_implementation_internal"}


def config_hash(config) -> str:
    """sha256 of the model's config, without what does not change the weights' meaning (name, attention
    implementation, dtype, versions)."""
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE}
    return _sha256(json.dumps(d, sort_keys=True, default=str))


def weights_fingerprint(model) -> str:
    """sha256 of a strided sample (about 4096 values) of every parameter: cheap, and changes with the weights."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu().contiguous()
            h.update(name.encode())
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def check_ablation(tokenizer, texts, cases: int, ablation_cases: int) -> None:
    """ablation_cases as `head_scores` honours it, or a ValueError: the ablation score is measured on the first
    `ablation_cases` of the `cases` needle cases, so it needs a tokenizer, calibration texts and that many cases
    (never silently fewer, never silently none)."""
    if not ablation_cases:
        return
    missing = ("no tokenizer" if tokenizer is None else "no calibration texts" if not texts else None)
    if missing:
        raise ValueError(f"ablation_cases={ablation_cases}: the ablation score is measured on needle cases, which need "
                         f"a tokenizer and calibration texts, and this call has {missing}: pass them, or "
                         "ablation_cases=0")
    if ablation_cases > cases:
        raise ValueError(f"ablation_cases={ablation_cases} is more than the cases={cases} needle cases it is measured "
                         "on: pass ablation_cases <= cases (or more cases)")


def check_reconstruction(tokenizer, texts, reconstruction_tokens: int) -> None:
    """reconstruction_tokens as `head_scores` honours it, or a ValueError: the reconstruction score replays
    calibration text, so it needs a tokenizer (its replay prompts) and calibration texts."""
    if isinstance(reconstruction_tokens, bool) or not isinstance(reconstruction_tokens, int) or reconstruction_tokens < 0:
        raise ValueError(f"reconstruction_tokens must be an int >= 0, got {reconstruction_tokens!r}")
    if reconstruction_tokens and (tokenizer is None or not texts):
        missing = "no tokenizer" if tokenizer is None else "no calibration texts"
        raise ValueError(f"reconstruction_tokens={reconstruction_tokens}: the reconstruction score replays calibration "
                         f"text, which needs a tokenizer and calibration texts, and this call has {missing}: pass "
                         "them, or reconstruction_tokens=0")


def method_inputs(model, tokenizer=None, texts: Sequence[str] | None = None, *, seed: int = 0,
                  random_tokens: int = 256, repeats: int = 4, cases: int = 8, context_tokens: int = 768,
                  ablation_cases: int = 0, reconstruction_tokens: int = 0) -> dict:
    """Everything the scores depend on (JSON-able): equal inputs give equal scores. Caches compare this.
    An ablation_cases that `head_scores` cannot honour is a ValueError here too (`check_ablation`)."""
    from . import __version__

    check_ablation(tokenizer, texts, cases, ablation_cases)
    check_reconstruction(tokenizer, texts, reconstruction_tokens)
    retrieval = tokenizer is not None and bool(texts) and cases > 0
    return {"algorithm": ALGORITHM, "h2o_version": __version__,
            "transformers_major": int(transformers.__version__.split(".")[0]),
            "model": str(model.config.name_or_path), "model_type": model.config.model_type,
            "config_sha256": config_hash(model.config), "weights_sha256": weights_fingerprint(model),
            "dtype": str(model.dtype).removeprefix("torch."), "seed": seed,
            "random_tokens": random_tokens, "repeats": repeats,
            "cases": cases if retrieval else 0, "context_tokens": context_tokens if retrieval else 0,
            "texts_sha256": [_sha256(t) for t in texts] if retrieval else [],
            "tokenizer": (type(tokenizer).__name__, len(tokenizer)) if retrieval else None,
            **({"ablation_cases": ablation_cases, "ablation_window": list(ABLATION_WINDOW)}
               if ablation_cases else {}),
            **({"reconstruction_tokens": reconstruction_tokens, "reconstruction_window": RECONSTRUCTION_WINDOW,
                "texts_sha256": [_sha256(t) for t in texts], "tokenizer": (type(tokenizer).__name__, len(tokenizer))}
               if reconstruction_tokens else {})}


def random_sequences(vocab_size: int, length: int, repeats: int, seed: int = 0,
                     exclude: Sequence[int] = ()) -> list[torch.Tensor]:
    """`repeats` sequences of `length` random ids (distinct within a sequence when the range allows), drawn from
    [100, vocab_size - 100) (the whole vocabulary when it is too small for that), `exclude` left out."""
    margin = 100 if vocab_size - 200 >= max(length, 1) else 0
    allowed = torch.arange(margin, vocab_size - margin)
    if exclude:
        allowed = allowed[~torch.isin(allowed, torch.tensor(sorted(set(exclude)), dtype=torch.long))]
    if allowed.numel() < 2:
        raise ValueError(f"a vocabulary of {vocab_size} leaves too few ids to draw random tokens from")
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        if allowed.numel() >= length:
            pick = torch.randperm(allowed.numel(), generator=generator)[:length]
        else:
            pick = torch.randint(allowed.numel(), (length,), generator=generator)
        out.append(allowed[pick])
    return out


def head_scores(model, tokenizer=None, texts: Sequence[str] | None = None, *, seed: int = 0, random_tokens: int = 256,
                repeats: int = 4, cases: int = 8, context_tokens: int = 768, progress=None,
                text_names: Sequence[str] | None = None, ablation_cases: int = 0,
                reconstruction_tokens: int = 0) -> HeadScores:
    """Induction and echo scores of every KV head (from the model alone), and retrieval scores when a tokenizer and
    calibration `texts` (haystack strings) are given; see the module docstring for the definitions.

    progress: an optional tqdm-like object; `.update(1)` is called after each forward (`repeats` random
    sequences, then `cases` needle cases, then one per ablated head and case). text_names: labels of the texts,
    recorded in `method`. reconstruction_tokens: calibration tokens replayed for the reconstruction score (0: none;
    about 3 forwards' worth of compute per token; it needs a tokenizer and texts, else a ValueError before any work).
    ablation_cases: the needle cases the ablation score is measured on (0: no ablation score;
    it costs 1 + layers x KV heads forwards per case): at most `cases`, and it needs a tokenizer and texts; any
    other value is a ValueError before any work (`check_ablation`). `method` says, per score, what was computed
    or why it was omitted.
    Deterministic given the seed; the model is left exactly as it was (attention implementation, mode).
    """
    for name, value in (("random_tokens", random_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("cases", cases), ("ablation_cases", ablation_cases)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if texts and tokenizer is None:
        raise ValueError("texts given without a tokenizer: the retrieval score needs both")
    config = model.config
    layers, q_heads, kv_heads = shape_of(config)
    # the layers a policy compresses (a hybrid model's sliding-window layers are never evicted: no score for them)
    compressed = compressed_layers(config)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and 2 * random_tokens > limit:
        raise ValueError(f"random_tokens {random_tokens} repeated twice is {2 * random_tokens} positions, past the "
                         f"model's {limit}")
    retrieval = tokenizer is not None and bool(texts) and cases > 0
    inputs = method_inputs(model, tokenizer, texts, seed=seed, random_tokens=random_tokens, repeats=repeats,
                           cases=cases, context_tokens=context_tokens, ablation_cases=ablation_cases,
                           reconstruction_tokens=reconstruction_tokens)
    needles = []
    if retrieval:
        if context_tokens < 16:
            raise ValueError(f"context_tokens must be >= 16, got {context_tokens}")
        needles = needle_cases(tokenizer, list(texts), cases, context_tokens, seed)
        longest = max(len(c.ids) for c in needles)
        if limit and longest > limit:
            raise ValueError(f"the calibration prompts run to {longest} tokens, past the model's {limit}; "
                             "lower context_tokens")
    started = time.perf_counter()
    vocab = model.get_input_embeddings().num_embeddings
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    exclude = list(getattr(tokenizer, "all_special_ids", []) or []) if tokenizer is not None else []

    induction = torch.zeros(layers, q_heads, dtype=torch.float64)
    echo = torch.zeros(layers, q_heads, dtype=torch.float64)
    hits = torch.zeros(layers, q_heads, dtype=torch.int64)
    copied, answered, per_case = 0, 0, []
    trims = "logits_to_keep" in inspect.signature(model.forward).parameters
    with probed(model):
        for x in random_sequences(vocab, random_tokens, repeats, seed, exclude):
            def reduce(layer, probs, r=random_tokens):
                ind, ech = induction_echo_from_attention(probs[0], r)
                induction[layer] += ind.double().cpu()
                echo[layer] += ech.double().cpu()
            _forward(model, torch.cat([x, x]), reduce, layers)
            if progress is not None:
                progress.update(1)
        for case in needles:
            queries, targets = copied_targets(case.ids, case.needle, case.answer)
            case_hits = torch.zeros(layers, q_heads, dtype=torch.int64)

            def reduce(layer, probs, queries=queries, targets=targets, case_hits=case_hits):
                if queries:
                    case_hits[layer] += retrieval_hits(probs[0], queries, targets).cpu()
            keep = len(case.ids) - case.answer.start + 1  # logits from the query before the first code token
            out = _forward(model, case.ids, reduce, layers, **({"logits_to_keep": keep} if trims else {}))
            predicted = out.logits[0, -keep:-1].argmax(-1).tolist()[: len(case.answer)]
            correct = sum(int(p == case.ids[t]) for p, t in zip(predicted, case.answer))
            hits += case_hits
            copied += len(queries)
            answered += correct
            per_case.append({"code": case.code, "depth": round(case.depth, 4), "at": round(case.at, 4),
                             "prompt_tokens": case.answer.start,
                             "context_tokens": case.context_tokens, "code_tokens": len(case.answer),
                             "copied_tokens": len(queries), "teacher_forced_correct": correct,
                             "best_head_hits": int(case_hits.max()) if queries else 0})
            if progress is not None:
                progress.update(1)
        drops = None
        if retrieval and ablation_cases:
            drops = ablation_drops(model, needles[:ablation_cases], layers, q_heads, kv_heads, trims, progress,
                                   ablated=compressed)

    reconstruction = None
    if reconstruction_tokens:
        windows = reconstruction_windows(tokenizer, list(texts), reconstruction_tokens, seed)
        reach = max(map(len, windows))
        if limit and 2 * reach > limit:
            raise ValueError(f"a reconstruction window and its replay run to about {2 * reach} positions, past the "
                             f"model's {limit}")
        reconstruction = reconstruction_scores(model, tokenizer, windows, progress)

    rows = torch.tensor(compressed)
    induction, echo, hits = induction[rows], echo[rows], hits[rows]
    scores = {"induction": group_max((induction / repeats).float(), kv_heads).clamp(0, 1),
              "echo": group_max((echo / repeats).float(), kv_heads).clamp(0, 1)}
    method = {
        "inputs": inputs,
        # the model layer of each table row: every layer, or a hybrid model's full-attention layers only
        "layers": compressed,
        "query_heads_per_kv_head": q_heads // kv_heads,
        "kv_head_score": "max over the query heads of the KV head's group",
        "induction": (f"RazorAttention: {repeats} x {random_tokens} random token ids (torch.Generator seed {seed}), "
                      f"each repeated twice ({2 * random_tokens} tokens per forward); the mean attention of the "
                      "second copy's queries on the token after their token's previous occurrence"),
        "echo": "the same queries' mean attention on their token's previous occurrence",
        "token_counts": {"random_sequence": 2 * random_tokens, "random_queries": repeats * random_tokens},
        "texts": list(text_names) if text_names is not None else None,
        "h2o_version": inputs["h2o_version"], "transformers": transformers.__version__, "torch": torch.__version__,
        "device": str(model.get_input_embeddings().weight.device),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if retrieval and copied:
        scores["retrieval"] = group_max((hits.double() / copied).float(), kv_heads).clamp(0, 1)
        method["retrieval"] = (f"Retrieval Head (Wu et al. 2024): {cases} needle cases (seed {seed}), about "
                               f"{context_tokens} haystack tokens each, needle '{NEEDLE}' at depths 0.1-0.9, the "
                               "answer teacher-forced; a query head's hits / copied answer tokens, a hit being "
                               "an attention argmax on the needle position that holds the token it predicts")
        method["token_counts"].update(retrieval_prompts=[c["prompt_tokens"] for c in per_case],
                                      copied_tokens=copied, teacher_forced_correct=answered)
        method["cases"] = per_case
    elif retrieval:
        method["retrieval"] = f"omitted: no answer token of the {cases} needle cases was copied from a needle"
    else:
        method["retrieval"] = ("omitted: no tokenizer" if tokenizer is None else "omitted: no calibration texts"
                               if not texts else "omitted: cases = 0")
    if drops is not None:
        top = float(drops.max())
        scores["ablation"] = (drops / top if top > 0 else torch.zeros_like(drops)).float().clamp(0, 1)
        method["ablation"] = (f"{ablation_cases} needle cases, each KV head in turn restricted to its first "
                              f"{ABLATION_WINDOW[0]} and last {ABLATION_WINDOW[1]} keys: the mean drop of the answer's "
                              "log-probability (teacher-forced, clamped at 0), over the largest drop of any head")
        method["ablation_drops"] = [[round(float(x), 6) for x in row] for row in drops]
    else:
        method["ablation"] = "omitted: ablation_cases = 0"
    if reconstruction is not None:
        scores["reconstruction"] = reconstruction
        method["reconstruction"] = (f"KVzip's context-independent head score: {len(windows)} window(s) of calibration "
                                    f"text ({sum(map(len, windows))} tokens, seed {seed}) each replayed in a KVzip cache "
                                    "holding it whole; the mean of each KV head's keys' KVzip scores (the largest "
                                    f"replay attention of its group), the first {RECONSTRUCTION_SINKS} keys excluded, "
                                    "over the windows")
        method["token_counts"]["reconstruction_windows"] = [len(w) for w in windows]
    else:
        method["reconstruction"] = "omitted: reconstruction_tokens = 0"
    method["seconds"] = round(time.perf_counter() - started, 3)
    return HeadScores(scores, method)
