"""h2o: KV-cache compression (StreamingLLM, H2O) for Hugging Face transformers.

    import h2o
    cache = h2o.make_cache(model, "h2o_4_32_256")   # sinks 4, recent 32, budget 256
    model.generate(ids, past_key_values=cache, max_new_tokens=1000)
    h2o.restore(model)

Not to be confused with the unrelated `h2o` ML platform package, which has the same import name.
"""

from .cache import CompressedCache, CompressedLayer
from .models import SUPPORTED_FAMILIES, make_cache, restore
from .policies import (DEFAULT_SCORE, H2O, Full, Observation, Policy, Streaming, keep_indices, parse, policy_names,
                       register_policy, resolve)

__all__ = [
    "make_cache", "restore", "parse", "resolve", "keep_indices", "register_policy", "policy_names", "Policy",
    "Observation", "Full", "Streaming", "H2O", "CompressedCache", "CompressedLayer", "DEFAULT_SCORE",
    "SUPPORTED_FAMILIES",
]
__version__ = "0.1.0"
