"""Value-aware token pruning, VATP (Guo et al., 2024): H2O's accumulated attention times the value's L1 norm.

A token that draws attention but carries a near-zero value changes the output little; weighting by
||v||_1 keeps the tokens that matter to the output. Sinks are pinned explicitly (their values are
small, so VATP alone would drop them). The attention part is H2O's, with its rules (`sum`, the
paper's, or `mean`, the default here as for H2O): VATP is H2O with one more state tensor and rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_policy
from .h2o import H2O, scored


@register_policy
@dataclass(frozen=True)
class VATP(H2O):
    NAME = "vatp"
    GRAMMAR = "vatp_<sinks>_<recent>_<budget>[_mean|_sum]"
    EXAMPLE = "vatp_4_32_256"
    state = ("score", "value_norm")

    def initial_state(self, keys, values):
        b, h, q, _ = keys.shape
        return {"score": keys.new_zeros(b, h, q, dtype=torch.float32), "value_norm": values.float().abs().sum(dim=-1)}

    def rank(self, state, times, seen, **slots):
        return scored(self, state["score"], times, seen) * state["value_norm"]
