"""h2o: KV-cache compression (StreamingLLM, H2O and the field's newer rules) for Hugging Face transformers.

    import h2o
    cache = h2o.make_cache(model, "h2o_4_32_256")   # sinks 4, recent 32, budget 256
    model.generate(ids, past_key_values=cache, max_new_tokens=1000)
    h2o.restore(model)

Not to be confused with the unrelated `h2o` ML platform package, which has the same import name.
The names below are imported on first use, so that `import h2o.eval.cli` (`h2o --help`) stays light.
"""

import importlib

_EXPORTS = {
    "make_cache": "models", "restore": "models", "SUPPORTED_FAMILIES": "models", "load_model": "eval.checkpoints",
    "register_allocation": "policies.allocation", "Allocation": "policies.allocation",
    "CompressedCache": "cache", "CompressedLayer": "compressed_layer", "UnobservedError": "compressed_layer",
    "head_scores": "head_probes", "HeadScores": "head_probes",
    "fit_surrogate": "surrogate_fit", "Surrogate": "score_surrogate",
    **{name: "policies" for name in (
        "parse", "resolve", "keep_indices", "register_policy", "policy_names", "Policy", "Observation",
        "families", "at_budget", "Full", "Streaming", "H2O", "TOVA", "A2SF", "VATP", "KNorm", "KeyDiff", "SnapKV", "CAOTE", "VLen", "KVzip", "KVzap", "recommended",
        "DEFAULT_SCORE")},
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("policies", "cache", "models", "attention", "rope", "eval", "head_probes", "score_surrogate"):  # submodules, on first use
        return importlib.import_module(f".{name}", __name__)
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'h2o' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
