"""The one memory meter of every command: current and peak bytes, on CUDA or on the CPU.

CUDA: allocated bytes (`torch.cuda.memory_allocated`) and their peak (`max_memory_allocated`).
CPU: the process's resident set; its peak is Linux's VmHWM, reset through /proc/self/clear_refs at
`start()` (elsewhere: psutil, sampled at each `sample()`). Both peaks are process-wide counters that
a meter resets when it starts, so meters nest: before a reset, every meter still running takes the
peak so far into its own, and a measurement around another one stays exact.
"""

from __future__ import annotations

import ctypes
import gc

import psutil
import torch

_running: list["PeakMemory"] = []
MEMORY_SHARE = 0.5  # caches may grow to this share of (memory available + what they already hold)
OK, OOM, SKIPPED = "ok", "OOM", "skipped: would exceed memory"  # what a run's status says when it goes on or stops


def is_oom(err: BaseException) -> bool:
    """Whether `err` is the allocator running out of memory (CUDA, or the CPU allocator's message)."""
    return isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in str(err)


def current_bytes(device: torch.device) -> int:
    """What the process holds now: CUDA allocated bytes, or the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return psutil.Process().memory_info().rss


def kind(device: torch.device) -> str:
    """The name of what `current_bytes` reads, for the outputs."""
    return "cuda_allocated" if device.type == "cuda" else "rss"


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the resident set reflects live memory again."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_peak(device: torch.device) -> int | None:
    """The process-wide peak since its last reset, or None where there is no such counter."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024
    except (OSError, StopIteration):
        return None


def _reset_peak(device: torch.device) -> bool:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory from `start()` to `stop()`; `stop()` returns (bytes, kind). Also a context manager
    (`with PeakMemory(device) as m: ...`, then `m.peak`, `m.growth`). `baseline` is what was held at
    the start (after freeing what can be freed)."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.baseline = self.peak = 0
        self.kind = ""

    def start(self) -> "PeakMemory":
        gc.collect()
        _release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
        self._fold_running()
        exact = _reset_peak(self.device)
        self.baseline = self.peak = current_bytes(self.device)
        if self.device.type == "cuda":
            self.kind = "cuda_peak_allocated"
        else:
            self.kind = "peak_rss" if exact else "peak_rss_sampled"
        _running.append(self)
        return self

    def sample(self) -> None:
        """Take the current reading into the peak (needed only where no peak counter exists)."""
        self.peak = max(self.peak, current_bytes(self.device))

    def stop(self) -> tuple[int, str]:
        self.sample()
        self._fold_running()
        if self in _running:
            _running.remove(self)
        return self.peak, self.kind

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _fold_running(self) -> None:
        """Every running meter on this device takes the counter's peak so far (before it is reset)."""
        peak = _read_peak(self.device)
        if peak is None:
            return
        for meter in _running:
            if meter.device == self.device:
                meter.peak = max(meter.peak, peak)
