"""A model's surrogate of KVzip's scores (`h2o.fit_surrogate`), fitted once and cached beside the model: what
`h2o surrogate` prints and every kvzap rule of the commands ranks by.

It is fitted on KVzip scores of the calibration book no evaluation uses (`head_score_cache.CALIBRATION_BOOK`, PG-19
3129), so a surrogate is never fitted on the texts it is then measured on.

    built-in models    <its converted copy>/kvzip_surrogate_<tokens>.safetensors
    any other model    beside its head scores: $H2O_CACHE_DIR/head_scores/<model>-<hash>_kvzip_surrogate_<tokens>...

A cached file is used only when its inputs (the model's config and weights fingerprint, dtype, seed, tokens, the
calibration text's hash, the h2o and transformers versions) equal this run's; otherwise it is refitted and replaced
atomically.
"""

from __future__ import annotations

import json

from . import data
from .head_score_cache import CALIBRATION_BOOK, cache_path as head_scores_path

TOKENS = 4096  # calibration tokens: 4 windows of 1,024, the last held out
SEED = 0


def cache_path(model_name: str, tokens: int = TOKENS):
    path = head_scores_path(model_name)
    stem = path.stem.removesuffix("head_scores").rstrip("_")
    return path.with_name(f"{stem + '_' if stem else ''}kvzip_surrogate_{tokens}.safetensors")


def inputs(model, tokenizer, text: str, tokens: int, seed: int) -> dict:
    """Everything the fit depends on (JSON-able): equal inputs give an equal surrogate."""
    import transformers

    from h2o import __version__
    from h2o.head_probes import _sha256, config_hash, weights_fingerprint
    from h2o.score_surrogate import ALGORITHM

    return {"algorithm": ALGORITHM, "h2o_version": __version__, "transformers_major": int(transformers.__version__.split(".")[0]),
            "model": str(model.config.name_or_path), "config_sha256": config_hash(model.config),
            "weights_sha256": weights_fingerprint(model), "dtype": str(model.dtype).removeprefix("torch."),
            "tokens": tokens, "seed": seed, "text_sha256": _sha256(text),
            "tokenizer": (type(tokenizer).__name__, len(tokenizer))}


def lookup(model, tokenizer, model_name: str, data_dir=None, progress=None, *, book: str = CALIBRATION_BOOK,
           tokens: int = TOKENS, seed: int = SEED, recompute: bool = False):
    """(surrogate, cache path, whether the cached file was reused)."""
    from h2o.score_surrogate import Surrogate
    from h2o.surrogate_fit import fit_surrogate

    if tokenizer is None:
        raise ValueError(f"a kvzap rule's surrogate is fitted on KVzip scores of calibration text, which needs the "
                         f"model's tokenizer; {model_name} has none (a random-weight model: use a real model)")
    text, source = data.load_document("pg19", book, data_dir)
    wanted = json.loads(json.dumps(inputs(model, tokenizer, text, tokens, seed), sort_keys=True))
    path = cache_path(model_name, tokens)
    if path.is_file() and not recompute:
        try:
            cached = Surrogate.load(path)
        except (ValueError, KeyError, TypeError, OSError):
            cached = None
        if cached is not None and cached.method.get("inputs") == wanted:
            return cached, path, True
    surrogate = fit_surrogate(model, tokenizer, [text], tokens, seed, progress, text_names=[f"pg19:{book}"])
    surrogate.method.update(inputs=wanted, calibration_text={"name": f"pg19:{book}", "source": source})
    surrogate.save(path)
    return surrogate, path, False


def surrogate_for(model, tokenizer, model_name: str, data_dir=None, progress=None, **options):
    return lookup(model, tokenizer, model_name, data_dir, progress, **options)[0]
