"""A model's KV-head scores (`h2o.head_scores`), computed once and cached beside the model: what `h2o heads`
prints and the head-wise allocations of every command rank by.

retrieval is scored on calibration needles in a PG-19 book that no evaluation of this project uses
(`CALIBRATION_BOOK`, 3129; the evaluations read 10146, 10321, 24553 and 2544), so that heads chosen by it are
not tuned on the texts they are then measured on.

    built-in models    <its converted copy, checkpoints.builtin_copy(name)>/head_scores.json
    any other model    $H2O_CACHE_DIR (default ~/.cache/h2o)/head_scores/<model name, made safe>-<hash>.json

A cached file is used only when its inputs (`h2o.head_probes.method_inputs`: the model's config and a fingerprint
of its weights, dtype, seed, token counts, cases, the calibration text's hash, the h2o version) equal this run's;
otherwise the scores are recomputed and the file replaced atomically.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from . import data

CALIBRATION_BOOK = "3129"  # PG-19 test book no evaluation uses (they use 10146, 10321, 24553, 2544)
DEFAULTS = {"seed": 0, "random_tokens": 256, "repeats": 4, "cases": 8, "context_tokens": 768, "ablation_cases": 0,
            "reconstruction_tokens": 0}
ABLATION_CASES = 4  # what an allocation ranking heads by ablation asks for (`h2o.eval.runners.head_scores`)
# what an allocation ranking heads by reconstruction asks for: two windows of 1,024 tokens of the calibration book
RECONSTRUCTION_TOKENS = 2048


def cache_path(model_name: str) -> Path:
    """Where the scores of `model_name` are cached (see the module docstring)."""
    from . import checkpoints  # here, not at the top: the command line's options read this module's names without torch

    if model_name in (checkpoints.EMBEDDED, checkpoints.GEMMA3):
        return checkpoints.builtin_copy(model_name) / "head_scores.json"
    key = str(Path(model_name).expanduser().resolve()) if Path(model_name).expanduser().is_dir() else model_name
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._")[-80:] or "model"
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    # beside the embedded copy's folder, not inside it: checkpoints._convert renames a fresh copy onto that folder
    return checkpoints.cache_dir().parents[1] / "head_scores" / f"{safe}-{digest}.json"


def lookup(model, tokenizer, model_name: str, data_dir=None, progress=None, *, book: str = CALIBRATION_BOOK,
           text: tuple[str, str] | None = None, recompute: bool = False, **options):
    """(scores, cache path, whether the cached file was reused): the cached scores of the model when their inputs
    are this call's, else computed (`h2o.head_scores`) and cached. `options`: seed, random_tokens, repeats,
    cases, context_tokens (default `DEFAULTS`); `text`: the calibration text if already read."""
    from h2o.head_probes import HeadScores, head_scores, method_inputs

    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown head-score options: {', '.join(sorted(unknown))}")
    options = {**DEFAULTS, **options}
    texts, names = None, None
    if tokenizer is not None and (options["cases"] > 0 or options["reconstruction_tokens"] > 0):
        if text is None:
            text = data.load_document("pg19", book, data_dir)
        texts, names = [text[0]], [f"pg19:{book}"]
    path = cache_path(model_name)
    if options["ablation_cases"]:  # its own file: the scores without ablation stay cached beside it
        path = path.with_name(path.stem + f"_ablation{options['ablation_cases']}" + path.suffix)
    if options["reconstruction_tokens"]:  # the same: its own file
        path = path.with_name(path.stem + f"_reconstruction{options['reconstruction_tokens']}" + path.suffix)
    inputs = _normal(method_inputs(model, tokenizer, texts, **options))
    if path.is_file() and not recompute:
        try:
            cached = HeadScores.load(path)
        except (ValueError, KeyError, TypeError, OSError):  # unreadable or of another format: recomputed
            cached = None
        if cached is not None and _normal(cached.method.get("inputs")) == inputs:
            return cached, path, True
    scores = head_scores(model, tokenizer, texts, progress=progress, text_names=names, **options)
    scores.method["calibration_text"] = {"name": names[0], "source": text[1]} if names else None
    scores.save(path)
    return scores, path, False


def scores_for(model, tokenizer, model_name: str, data_dir=None, progress=None, **options):
    """The model's head scores (`h2o.head_probes.HeadScores`), computed once and cached beside the model (see the module
    docstring); `options` as `lookup`'s (book, recompute, seed, random_tokens, repeats, cases, context_tokens)."""
    return lookup(model, tokenizer, model_name, data_dir, progress, **options)[0]


def _normal(value):
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None
