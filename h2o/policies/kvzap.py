"""KVzap-style (Jegou & Jeblick, 2026): rank the context by a surrogate of KVzip's scores, with no replay.

Each token's key and value, as the cache receives them, go through a small predictor fitted once per model on
KVzip's scores of calibration text (`h2o.score_surrogate`, `h2o.fit_surrogate`, `h2o surrogate`); its output, the predicted
log KVzip score, is the slot's score from then on. Prompt tokens and generated tokens alike: nothing is observed from
attention, so the prefill costs what StreamingLLM's does plus one small matrix product per token and layer.
``kvzap_<sinks>_<recent>_<budget>`` uses the ridge regression, ``..._mlp`` the MLP. On the log scale the scores of
different heads and layers are comparable, as KVzip's are: ``global+kvzap_...`` is KVzip's default layout without
the replay.

A kvzap rule needs its surrogate: `h2o.make_cache(model, "kvzap_...", surrogate=surrogate)` binds it, and each layer
(each head group) of the cache gets its own layer's and heads' predictors (`at_layer`, `for_heads`). A kvzap rule with
no surrogate bound refuses its first tokens: it would otherwise rank nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import register_policy
from .base import Sized


@register_policy
@dataclass(frozen=True)
class KVzap(Sized):
    NAME = "kvzap"
    GRAMMAR = "kvzap_<sinks>_<recent>_<budget>[_mlp]"
    EXAMPLE = "kvzap_4_32_256"
    PATTERN = Sized.PATTERN + r"(?:_(?P<kind>mlp))?"
    state = ("score",)
    needs_surrogate = True
    FAMILY_VARIANTS = ("mlp",)  # h2o.policies.families(): kvzap_mlp, sized like kvzap (h2o tasks --policies kvzap_mlp)

    mlp: bool = False
    # bound by h2o.make_cache: the fitted surrogate, this layer's row in it and the KV heads a layer (or head group) holds
    surrogate: object = field(default=None, compare=False, repr=False)
    layer: int = 0
    heads: tuple | None = None

    @classmethod
    def from_name(cls, name, score=None):
        m = cls.match(name)
        return cls(int(m["sinks"]), int(m["recent"]), int(m["budget"]), mlp=m["kind"] == "mlp") if m else None

    @property
    def name(self) -> str:
        return super().name + ("_mlp" if self.mlp else "")

    def with_surrogate(self, surrogate) -> "KVzap":
        return dataclasses.replace(self, surrogate=surrogate)

    def at_layer(self, layer: int) -> "KVzap":
        return dataclasses.replace(self, layer=layer)

    def for_heads(self, heads) -> "KVzap":
        return dataclasses.replace(self, heads=tuple(heads))

    def initial_state(self, keys, values):
        if self.surrogate is None:
            raise ValueError(f"{self.name} ranks tokens by a fitted surrogate of KVzip's scores, and none is bound: "
                             "h2o.make_cache(model, ..., surrogate=h2o.fit_surrogate(model, tokenizer, [text])) (or the "
                             "h2o commands, which fit and cache it per model)")
        heads = self.heads if self.heads is not None else tuple(range(keys.shape[1]))
        if len(heads) != keys.shape[1]:
            raise ValueError(f"{self.name}: bound to KV heads {heads}, given keys of {keys.shape[1]}")
        return {"score": self.surrogate.predict(self.layer, heads, keys, values, "mlp" if self.mlp else "linear")}

    def rank(self, state, times, seen, **slots):
        return state["score"]
