"""A surrogate of KVzip's scores (KVzap-style, Jegou & Jeblick 2026): a small model per KV head that predicts, from a
key and its value alone, the score KVzip's replay would give it, so that a rule ranks the context as KVzip does
without replaying it (`kvzap_<sinks>_<recent>_<budget>[_mlp]`, `h2o.policies.kvzap`).

    surrogate = h2o.fit_surrogate(model, tokenizer, [calibration_text])      # a minute or two on a CPU
    cache = h2o.make_cache(model, "global+kvzap_4_32_256", surrogate=surrogate)

What it reads. KVzap reads each layer's hidden states; this surrogate reads what the cache itself is handed, each
token's key and value in its KV head, so it needs no hook on the model and scores in every layout (head groups,
rows, the shared budget) from `Policy.initial_state`. A key arrives rotated at its position (RoPE), so it is read
through what the rotation leaves unchanged: the norm of each rotated pair of dimensions (i, i + r/2, r the rotary
dims), with the unrotated dimensions as they are; the value is read whole. `features` is that map.

What it predicts. log(KVzip score), the score being the largest probability any replay query of the KV head's group
gives the key (`h2o.replay`); on the log scale a score is comparable across heads and layers, as KVzip's are, so
`global+kvzap_...` ranks every head of every layer in one top-k.

How it is fitted (`fit_surrogate`). Windows of calibration text (`h2o.head_probes.reconstruction_windows`), each fed
once into a KVzip cache that holds it whole: every key, its value and its KVzip score, per layer and KV head, the
sinks left out. The last window is held out. Per KV head: a ridge regression (`linear`, closed form, features
standardised) and a one-hidden-layer MLP (`mlp`, Adam on the standardised features). The held-out fit is recorded
per head and kind: Spearman's rank correlation with the true scores, and the share of the true top 20% that the
predicted top 20% finds (the budget's question).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

KINDS = ("linear", "mlp")
HIDDEN = 32  # the MLP's hidden width
RIDGE = 1.0  # the ridge penalty on standardised features
MLP_STEPS = 400
MLP_LR = 3e-3
FLOOR = 1e-6  # scores are clamped here before the log
TOP_SHARE = 0.2  # the held-out overlap's budget
FORMAT = "h2o-kvzip-surrogate"
FORMAT_VERSION = 1
ALGORITHM = 2  # bump when the fit or its record changes: cached surrogates with another value are refitted


def features(keys: torch.Tensor, values: torch.Tensor, rotary_dims: int) -> torch.Tensor:
    """[..., F] per token, F = rotary_dims / 2 + (D - rotary_dims) + Dv, from keys [..., D] rotated by RoPE in the
    rotate-half layout over their first `rotary_dims` and values [..., Dv]: the norm of each rotated pair (unchanged by
    any rotation), the unrotated key dimensions, the value. float32."""
    if rotary_dims % 2 or not 0 < rotary_dims <= keys.shape[-1]:
        raise ValueError(f"rotary_dims must be even and in (0, {keys.shape[-1]}], got {rotary_dims}")
    k = keys.float()
    half = rotary_dims // 2
    pairs = (k[..., :half].square() + k[..., half:rotary_dims].square()).sqrt()
    return torch.cat([pairs, k[..., rotary_dims:], values.float()], dim=-1)


@dataclass
class Surrogate:
    """Per compressed layer and KV head, a fitted predictor of log(KVzip score) from `features`.

    mean, std [L, H, F]: the standardisation; linear [L, H, F + 1] (the last column the bias); mlp: w1 [L, H, F, HIDDEN],
    b1 [L, H, HIDDEN], w2 [L, H, HIDDEN], b2 [L, H]. `rotary_dims` and `head_dim` say which keys it reads; `method` how it
    was fitted and its held-out fit."""

    rotary_dims: int
    head_dim: int
    tensors: dict[str, torch.Tensor]
    method: dict = field(default_factory=dict)

    # the model's, not a cache's: shared by every cache made with it, as the model's weights are (`kv_bytes` leaves it
    # out and says so; `nbytes` is its size)
    MODEL_SIDE = True

    def __post_init__(self):
        need = {"mean", "std", "linear", "w1", "b1", "w2", "b2"}
        if set(self.tensors) != need:
            raise ValueError(f"a surrogate needs the tensors {sorted(need)}, got {sorted(self.tensors)}")
        layers, heads, f = self.tensors["mean"].shape
        expected = {"std": (layers, heads, f), "linear": (layers, heads, f + 1), "w1": (layers, heads, f, HIDDEN),
                    "b1": (layers, heads, HIDDEN), "w2": (layers, heads, HIDDEN), "b2": (layers, heads)}
        for name, shape in expected.items():
            if tuple(self.tensors[name].shape) != shape:
                raise ValueError(f"surrogate tensor {name} has shape {tuple(self.tensors[name].shape)}, expected {shape}")
        self.tensors = {name: t.detach().float().contiguous() for name, t in self.tensors.items()}
        self._on: dict = {}  # device -> the tensors there
        self._index: dict = {}  # (device, heads) -> their index tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(compressed layers, KV heads)."""
        return tuple(self.tensors["mean"].shape[:2])

    def nbytes(self) -> int:
        """Bytes of its tensors (each device's copy counted once per device it was used on)."""
        per_copy = sum(t.numel() * t.element_size() for t in self.tensors.values())
        return per_copy * (1 + sum(1 for d in self._on if d != "cpu"))

    @property
    def width(self) -> int:
        """F, the features per token."""
        return self.tensors["mean"].shape[-1]

    def check(self, layers: int, heads: int, head_dim: int, rotary_dims: int | None) -> None:
        """A ValueError unless this surrogate was fitted on a model of this shape."""
        if self.shape != (layers, heads) or self.head_dim != head_dim or \
                (rotary_dims is not None and rotary_dims != self.rotary_dims):
            raise ValueError(f"this surrogate was fitted on {self.shape[0]} compressed layers x {self.shape[1]} KV heads "
                             f"of {self.head_dim} dims ({self.rotary_dims} rotary), and the model has {layers} x {heads} "
                             f"of {head_dim} ({rotary_dims}): fit one on this model (h2o.fit_surrogate, h2o surrogate)")

    def _heads(self, heads: tuple[int, ...], device) -> torch.Tensor:
        """The index tensor of `heads` on `device`, made once (a decode step copies nothing to the device)."""
        key = (str(device), heads)
        if key not in self._index:
            self._index[key] = torch.tensor(heads, device=device)
        return self._index[key]

    def _tensors(self, device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._on:
            self._on[key] = {name: t.to(device) for name, t in self.tensors.items()}
        return self._on[key]

    def predict(self, layer: int, heads: tuple[int, ...], keys: torch.Tensor, values: torch.Tensor,
                kind: str = "linear") -> torch.Tensor:
        """[B, h, q] float32 predicted log(KVzip score) of new tokens: keys [B, h, q, D], values [B, h, q, Dv] of
        compressed layer `layer`'s KV heads `heads` (in that order)."""
        if kind not in KINDS:
            raise ValueError(f"surrogate kind must be one of {KINDS}, got {kind!r}")
        t = self._tensors(keys.device)
        idx = self._heads(tuple(heads), keys.device)
        x = features(keys, values, self.rotary_dims)  # [B, h, q, F]
        x = (x - t["mean"][layer, idx].unsqueeze(1)) / t["std"][layer, idx].unsqueeze(1)
        if kind == "linear":
            w = t["linear"][layer, idx]  # [h, F + 1]
            return torch.einsum("bhqf,hf->bhq", x, w[:, :-1]) + w[:, -1].view(1, -1, 1)
        hidden = torch.einsum("bhqf,hfk->bhqk", x, t["w1"][layer, idx]) + t["b1"][layer, idx].unsqueeze(1)
        hidden = torch.nn.functional.gelu(hidden)
        return torch.einsum("bhqk,hk->bhq", hidden, t["w2"][layer, idx]) + t["b2"][layer, idx].view(1, -1, 1)

    # --- on disk: safetensors for the weights, their metadata the JSON of everything else ----------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (a temporary file beside it, then os.replace)."""
        from safetensors.torch import save_file

        from .files import atomic_path

        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "rotary_dims": str(self.rotary_dims),
                "head_dim": str(self.head_dim), "method": json.dumps(self.method)}
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata=meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Surrogate":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("version") != str(FORMAT_VERSION):
                raise ValueError(f"{path}: not a version-{FORMAT_VERSION} {FORMAT} file")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return cls(int(meta["rotary_dims"]), int(meta["head_dim"]), tensors, json.loads(meta["method"]))


# --- fitting ---------------------------------------------------------------------------------------------------

def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def top_overlap(predicted: torch.Tensor, true: torch.Tensor, share: float = TOP_SHARE) -> float:
    """The share of the true top `share` of tokens that the predicted top `share` holds."""
    k = max(1, int(share * true.numel()))
    return len(set(predicted.topk(k).indices.tolist()) & set(true.topk(k).indices.tolist())) / k


def fit_heads(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> dict[str, torch.Tensor]:
    """The predictors of G KV heads at once, from features x [G, N, F] and targets y [G, N] (log scores): per head the
    standardisation, the ridge regression (closed form) and the MLP (Adam, seeded; every head in one batched loop)."""
    mean, std = x.mean(1), x.std(1).clamp_min(1e-6)
    z = (x - mean.unsqueeze(1)) / std.unsqueeze(1)
    design = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1).double()
    penalty = RIDGE * torch.eye(design.shape[-1], dtype=torch.float64)
    penalty[-1, -1] = 0  # the bias is not penalised
    gram = design.transpose(1, 2) @ design + penalty
    linear = torch.linalg.solve(gram, design.transpose(1, 2) @ y.double().unsqueeze(-1)).squeeze(-1).float()
    generator = torch.Generator().manual_seed(seed)
    g, f = z.shape[0], z.shape[-1]
    w1 = (torch.randn(g, f, HIDDEN, generator=generator) / math.sqrt(f)).requires_grad_()
    b1 = torch.zeros(g, 1, HIDDEN, requires_grad=True)
    w2 = (torch.randn(g, HIDDEN, 1, generator=generator) / math.sqrt(HIDDEN)).requires_grad_()
    b2 = y.mean(1).view(g, 1, 1).clone().requires_grad_()
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=MLP_LR)
    with torch.enable_grad():
        for _ in range(MLP_STEPS):
            opt.zero_grad()
            pred = (torch.nn.functional.gelu(z @ w1 + b1) @ w2 + b2).squeeze(-1)
            loss = (pred - y).square().mean(1).sum()  # each head's own mean squared error
            loss.backward()
            opt.step()
    return {"mean": mean, "std": std, "linear": linear, "w1": w1.detach(), "b1": b1.detach().squeeze(1),
            "w2": w2.detach().squeeze(-1), "b2": b2.detach().view(g)}
