"""KeyDiff (Park et al., 2025; kvpress `KeyDiffPress`): keep the keys least like the average key.

Per KV head, the anchor is the mean of the kept keys' unit vectors (real tokens only); a key's
priority is minus its cosine similarity to the anchor, so distinctive keys stay. Nothing is
observed from attention; the rule reads the kept keys when it ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F

from . import register_policy
from .base import Sized


@register_policy
@dataclass(frozen=True)
class KeyDiff(Sized):
    NAME = "keydiff"
    GRAMMAR = "keydiff_<sinks>_<recent>_<budget>"
    EXAMPLE = "keydiff_4_32_256"

    def rank(self, state, times, seen, keys=None, valid=None, **slots):
        if keys is None:
            raise ValueError("keydiff ranks by the kept keys: pass keys= to keep_indices")
        unit = F.normalize(keys.float(), dim=-1)  # [B, H, L, D]
        if valid is not None:
            unit = unit * valid[:, None, :, None]
            count = valid.sum(-1).clamp_min(1).view(-1, 1, 1, 1)
        else:
            count = keys.shape[-2]
        anchor = F.normalize(unit.sum(dim=-2, keepdim=True) / count, dim=-1)
        return -(unit * anchor).sum(-1)
