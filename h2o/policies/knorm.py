"""Key norm (Devoto et al., 2024; kvpress `KnormPress`): keep the keys with the lowest L2 norm.

Low-norm keys tend to draw high attention, so the norm is a free proxy for it: nothing is observed
from attention (the attention function computes no scores for this rule). Reported to hold up to
about 50% eviction only.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_policy
from .base import Sized


@register_policy
@dataclass(frozen=True)
class KNorm(Sized):
    NAME = "knorm"
    GRAMMAR = "knorm_<sinks>_<recent>_<budget>"
    EXAMPLE = "knorm_4_32_256"
    state = ("key_norm",)

    def initial_state(self, keys, values):
        return {"key_norm": keys.float().norm(dim=-1)}

    def rank(self, state, times, seen, **slots):
        return -state["key_norm"]
