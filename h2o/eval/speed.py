"""Speed and memory of generation under each policy, measured so that configurations compare fairly.

Timing: every configuration gets its own cache over the same prompt, and the configurations
advance in lockstep (prefill of each, then one decode step of each in turn), so machine noise
falls on all alike; we keep every sample and report min and median. TTFT is the prefill forward
plus picking the first token; TPOT is one decode step (one new token per row).

Memory: `kv_bytes` is exact (the cache's tensors, bookkeeping included). Peak memory
(`h2o.eval.memory.PeakMemory`) is CUDA's peak allocated bytes on GPU, or the process's peak
resident set on CPU, each measured in a separate, sequential pass per configuration, together with
the time spent inside the attention modules per decode step ("Avg Attn").
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm


from .memory import PeakMemory
from .runners import describe, open_runner


@dataclass
class SpeedResult:
    policy: str
    context: int
    new_tokens: int
    batch: int
    ttft_s: list[float] = field(default_factory=list)  # one per repeat
    tpot_s: list[float] = field(default_factory=list)  # every decode step of every repeat
    attn_ms_per_step: float = float("nan")
    kv_bytes: int = 0
    peak_mem_bytes: int = 0
    peak_mem_kind: str = ""

    @property
    def ttft(self) -> float:
        return min(self.ttft_s)

    @property
    def tpot_min(self) -> float:
        return min(self.tpot_s)

    @property
    def tpot_median(self) -> float:
        return statistics.median(self.tpot_s)

    @property
    def total_s(self) -> float:
        """Best prefill plus `new_tokens - 1` median decode steps: one generation's wall time."""
        return self.ttft + (self.new_tokens - 1) * self.tpot_median

    @property
    def throughput(self) -> float:
        """Generated tokens per second over the whole generation, all rows together."""
        return self.batch * self.new_tokens / self.total_s


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """(seconds, result) of `fn()`, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def _run_step(runner, ids):
    """One forward of a runner (ours or a kvpress press), then the next token."""
    return runner.forward(ids, logits_to_keep=1)[:, -1:].argmax(-1)


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]


class AttentionTimer:
    """Wall time spent inside the model's attention modules (synchronised on GPU)."""

    def __init__(self, model, device):
        self.device, self.total, self._start = device, 0.0, 0.0
        self._handles = []
        for module in attention_modules(model):
            self._handles.append(module.register_forward_pre_hook(self._enter))
            self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, *_):
        sync(self.device)
        self._start = time.perf_counter()

    def _exit(self, *_):
        sync(self.device)
        self.total += time.perf_counter() - self._start

    def close(self):
        for handle in self._handles:
            handle.remove()


def measure_speed(model, ids: torch.Tensor, policies: list[str], *, new_tokens: int = 64, repeats: int = 3,
                  memory_steps: int = 8, positions: str = "original", buffer: int = 64,
                  progress: bool = True) -> dict[str, SpeedResult]:
    """TTFT/TPOT (interleaved), then attention time and peak memory (per policy) for prompt `ids` [B, T]."""
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2 to time a decode step, got {new_tokens}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    batch, context = ids.shape
    results = {p: SpeedResult(describe(p).name, context, new_tokens, batch) for p in policies}
    bar = tqdm(total=repeats * new_tokens * len(policies), desc="speed", disable=not progress, leave=False)
    with torch.no_grad():
        for _ in range(repeats):
            caches = {p: open_runner(model, p, positions=positions, buffer=buffer) for p in policies}
            nxt = {}
            for p, cache in caches.items():
                sync(device)
                start = time.perf_counter()
                nxt[p] = _run_step(cache, ids)
                sync(device)
                results[p].ttft_s.append(time.perf_counter() - start)
                bar.update()
            for _ in range(new_tokens - 1):
                for p, cache in caches.items():
                    sync(device)
                    start = time.perf_counter()
                    nxt[p] = _run_step(cache, nxt[p])
                    sync(device)
                    results[p].tpot_s.append(time.perf_counter() - start)
                    bar.update()
            for p, cache in caches.items():
                cache.check()
                results[p].kv_bytes = cache.kv_bytes()
                cache.close()
            del caches, nxt
        bar.close()
        for p in policies:
            _memory_and_attention_pass(model, ids, p, results[p], memory_steps, positions, buffer, device)
    return results


def _memory_and_attention_pass(model, ids, policy, result, steps, positions, buffer, device):
    meter = PeakMemory(device)
    meter.start()
    runner = open_runner(model, policy, positions=positions, buffer=buffer)
    nxt = _run_step(runner, ids)
    timer = AttentionTimer(model, device)
    try:
        for _ in range(steps):
            nxt = _run_step(runner, nxt)
            meter.sample()
    finally:
        timer.close()
        runner.close()
    result.attn_ms_per_step = 1000 * timer.total / steps
    result.peak_mem_bytes, result.peak_mem_kind = meter.stop()
