"""Rotary re-positioning for ``positions="reindex"`` (StreamingLLM's position shift).

RoPE rotations compose: a key rotated at position p and then by `delta` is the key rotated at
p + delta. So moving cached keys between slots, or a query from the model's position to its slot,
is one rotation by the difference, with the model's own inverse frequencies. Only the first
`rotary_dims` of each head are rotated (GPT-NeoX rotates 25% of them), in the rotate-half layout
that Llama and GPT-NeoX share in transformers.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """Rotate `x` [B, H, L, D] by `delta` positions ([B, H, L] or broadcastable), computed in float32."""
    angles = delta.to(torch.float32).unsqueeze(-1) * inv_freq.to(device=x.device, dtype=torch.float32)
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
    rot, rest = x[..., :rotary_dims].to(torch.float32), x[..., rotary_dims:]
    half = rotary_dims // 2
    rot_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    rotated = (rot * cos + rot_half * sin).to(x.dtype)
    return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated
