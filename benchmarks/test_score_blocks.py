"""The blocked attention's block size (`SCORE_BLOCK_ELEMENTS`) per device: one long prefill's attention and
scoring (`fused_attention`, what an H2O prefill runs in every layer) timed at several block sizes.

The device's chosen size must be within 25% of the fastest measured one (the JSON has every size's time).
Shapes: the speed model's attention (heads, KV heads, head dim) over the device's longest context.
"""

import time

import pytest
import torch

from h2o.attention import SCORE_BLOCK_ELEMENTS, fused_attention, score_block_elements
from h2o.eval.checkpoints import describe

pytestmark = pytest.mark.gpu
SIZES = [1 << e for e in range(18, 31, 2)]


def test_block_size(benchmark, bench, speed_model):
    model, _ = speed_model
    shape = describe(model)
    length = max(bench.sizes.contexts)
    heads, kv_heads, dim = shape["q_heads"], shape["kv_heads"], shape["head_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda h: torch.randn(1, h, length, dim, generator=g).to(bench.device, model.dtype)  # noqa: E731
    query, key, value = make(heads), make(kv_heads), make(kv_heads)
    chosen = score_block_elements(bench.device)
    sizes = sorted(set(SIZES + [chosen]))
    times = {}

    def run(elements):
        bench.sync()
        start = time.perf_counter()
        fused_attention(query, key, value, None, dim ** -0.5, None, frozenset({"mass"}), block_elements=elements)
        bench.sync()
        return time.perf_counter() - start

    def sweep():
        for elements in sizes:
            if elements * 8 > _free_bytes(bench.device):
                continue  # probabilities and logits of one block would not fit
            run(elements)  # warm-up
            times[elements] = min(run(elements) for _ in range(2))

    benchmark.pedantic(sweep, rounds=1, iterations=1)
    best = min(times, key=times.get)
    benchmark.extra_info.update(bench.info(
        model, "h2o_4_32_256", measure="score_blocks", context_tokens=length, chosen_elements=chosen,
        default_elements=SCORE_BLOCK_ELEMENTS, fastest_elements=best,
        seconds_by_elements={str(k): v for k, v in times.items()}))
    assert chosen in times, f"the chosen block of {chosen} elements does not fit in memory"
    assert times[chosen] <= 1.25 * times[best], (
        f"block of {chosen} elements: {times[chosen]:.3f} s; {best} elements: {times[best]:.3f} s (fastest)")


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil
    return psutil.virtual_memory().available
