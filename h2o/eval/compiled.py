"""Decode steps through `torch.compile(model.forward)` for `h2o perf --compile`, and the floor they are held to.

- `CompiledRunner`: one configuration's cache and its compiled forward: an h2o policy in the static layout
  (`h2o.make_cache(..., static=True)`), or `"full"`, transformers' `StaticCache` of the same capacity (budget +
  buffer + 1 slots: every decode step of both attends exactly that many slots). The prompt is prefilled eagerly
  (its shape is not the decode step's); the full cache is prefilled with the prompt's last `budget` tokens and,
  when its capacity is reached, reset and prefilled again between timed steps, so it always holds between
  budget and capacity tokens, as the compressed caches do.
- `copy_bandwidth`: bytes moved per second (read + written) by one large in-place copy, the minimum time of
  several; `weight_bytes / copy_bandwidth` is the decode step's floor (every weight read once per step; the KV
  cache's few MiB and the activations are left out, so the floor is a lower bound).
"""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters
from transformers import StaticCache

import h2o

from .speed import timed


def default_mode(device: torch.device) -> str:
    """CUDA graphs on CUDA (a decode step is dominated by kernel launches there); inductor's default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else "default"


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a recompile adds one)."""
    return int(counters["stats"]["unique_graphs"])


class CompiledRunner:
    def __init__(self, model, name: str, budget: int, buffer: int, mode: str, backend: str):
        self.model, self.name, self.budget = model, name, budget
        self.capacity = budget + buffer + 1
        if name == "full":
            self.cache = StaticCache(config=model.config, max_cache_len=self.capacity)
        else:
            self.cache = h2o.make_cache(model, name, buffer=buffer, static=True)
        options = {"mode": mode} if backend == "inductor" else {}
        self.forward = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=False, **options)
        self.position = 0  # the next token's position, passed as cache_position (as generate does)
        self.compile_s = float("nan")

    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """The prompt (eager); returns the next token. The full cache takes the prompt's last `budget` tokens."""
        if self.name == "full":
            self.cache.reset()
            prompt = prompt[:, -self.budget:]
        self.position = prompt.shape[1]
        logits = self.model(prompt, past_key_values=self.cache, use_cache=True, logits_to_keep=1).logits
        return logits[:, -1:].argmax(-1)

    def ready(self, token: torch.Tensor, refill: torch.Tensor) -> torch.Tensor:
        """Before a timed step: a full StaticCache at capacity is reset and prefilled again (untimed)."""
        if self.name == "full" and self.position >= self.capacity:
            return self.prefill(refill)
        return token

    def step(self, token: torch.Tensor) -> torch.Tensor:
        position = torch.tensor([self.position], device=token.device)
        self.position += 1
        logits = self.forward(input_ids=token, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                              cache_position=position).logits
        return logits[:, -1:].argmax(-1)

    def warm_up(self, token: torch.Tensor, refill: torch.Tensor, steps: int, device) -> torch.Tensor:
        """`steps` untimed steps; the first one's wall time (tracing and code generation) is `compile_s`."""
        for i in range(steps):
            token = self.ready(token, refill)
            seconds, token = timed(device, lambda: self.step(token))
            if i == 0:
                self.compile_s = seconds
        return token


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 2 ** 20, rounds: int = 7) -> float:
    """Bytes per second that one copy of `nbytes` reads and writes, the fastest of `rounds`."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of the pages
    return 2 * nbytes / min(timed(device, lambda: dst.copy_(src))[0] for _ in range(rounds))


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (tied weights once): what one decode step reads at least."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
