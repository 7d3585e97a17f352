"""The decode hot path does not sync with the host: on CUDA under `torch.cuda.set_sync_debug_mode`.

CUDA: decode steps of each compressed policy (evictions included: buffer + 1 steps) run with the sync
debug mode set to "warn"; every synchronising call is reported by torch as a warning whose location is the
Python line that made it. A sync from h2o's library is a failure; syncs from transformers' own code (not
ours to fix) are counted in the benchmark JSON. CPU (`--device cpu`): nothing syncs on a CPU, so the same
steps count the Tensor reads that would (`tests/test_host_sync.py` holds the per-rule version).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch

import h2o

pytestmark = pytest.mark.gpu
LIBRARY = Path(h2o.__file__).parent
READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


def _ours(filename: str) -> bool:
    path = Path(filename)
    return LIBRARY in path.parents and "eval" not in path.relative_to(LIBRARY).parts


@pytest.mark.parametrize("policy", ["streaming_4_252", "h2o_4_32_256"])
def test_decode_does_not_sync(benchmark, bench, speed_model, prompt_ids, policy, monkeypatch):
    model, _ = speed_model
    buffer = bench.sizes.buffer
    cache = h2o.make_cache(model, policy, buffer=buffer)
    token = bench.step(model, prompt_ids[:, :1024], cache)  # the prefill is not the hot path
    ours, theirs = [], []

    def decode():
        with torch.no_grad():
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits

    if bench.device.type == "cuda":
        def steps():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(buffer + 1):
                        decode()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            for w in caught:
                if "synchroniz" in str(w.message).lower():
                    (ours if _ours(w.filename) else theirs).append(f"{Path(w.filename).name}:{w.lineno}")
    else:
        def counted(name, real):
            def read(tensor, *args, **kwargs):
                caller = sys._getframe(1)
                if _ours(caller.f_code.co_filename):
                    ours.append(f"{name} in {Path(caller.f_code.co_filename).name}:{caller.f_code.co_name}")
                return real(tensor, *args, **kwargs)
            return read

        def steps():
            with monkeypatch.context() as patch:
                for name in READS:
                    patch.setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
                for _ in range(buffer + 1):
                    decode()

    seen_before = cache.get_seq_length()
    benchmark.pedantic(steps, rounds=1, iterations=1)
    assert cache.get_seq_length() == seen_before + buffer + 1
    assert max(cache.kept_lengths()) <= h2o.parse(policy).budget + buffer  # it evicted within the timed steps
    benchmark.extra_info.update(bench.info(model, policy, measure="host_sync", decode_steps=buffer + 1,
                                           syncs_h2o=len(ours), syncs_transformers=len(theirs),
                                           sync_sites_transformers=sorted(set(theirs))))
    assert ours == [], f"{policy}: the decode path synced with the host at {sorted(set(ours))}"
