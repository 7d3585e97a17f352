"""Peak memory and exact KV-cache bytes per policy: a prefill of `context` tokens, then a few decode steps.

Peak memory is CUDA's peak allocated bytes, or on CPU the process's peak resident set, over that
run (model weights included; `baseline_bytes` is what was held before it). The cache's bytes are
asserted exactly: the keys and values of the tokens each layer keeps under the lazy-eviction
schedule (an evicting policy: its preallocated budget + buffer + 1 slots), plus, for evicting policies, the
per-slot bookkeeping (arrival index int64 per row and
KV head, each float32 state tensor of the policy (H2O: its score) per row and KV head, a validity byte per row) and an int64 padding
count per row.
"""

import pytest

import h2o
from h2o.eval.checkpoints import describe
from h2o.eval.memory import PeakMemory

pytestmark = pytest.mark.gpu


def kept_after(policy, buffer: int, feeds: list[int]) -> int:
    """Tokens a layer keeps after forwards of `feeds` tokens each: cut back to `budget` once above budget + buffer."""
    kept = 0
    for q in feeds:
        kept += q
        if policy.evicts and kept > policy.budget + buffer:
            kept = policy.budget
    return kept


def test_memory(benchmark, bench, speed_model, prompt_ids, case):
    name, context, batch = case
    model, _ = speed_model
    policy, steps, buffer = h2o.parse(name), bench.sizes.memory_steps, bench.sizes.buffer

    def run():
        cache = h2o.make_cache(model, policy, positions=bench.sizes.positions, buffer=buffer)
        meter = PeakMemory(bench.device)
        meter.start()
        token = bench.step(model, prompt_ids[:, :context].expand(batch, -1), cache)
        for _ in range(steps):
            token = bench.step(model, token, cache)
            meter.sample()
        return cache, (*meter.stop(), meter.baseline)

    cache, (peak, kind, baseline) = benchmark.pedantic(run, rounds=1, iterations=1)

    shape = describe(model)
    layers, rows, heads, elem = shape["layers"], batch, shape["kv_heads"], model.dtype.itemsize
    kv_per_token = rows * heads * 2 * shape["head_dim"] * elem  # keys + values, one layer
    seen = context + steps
    kept = kept_after(policy, buffer, [context] + [1] * steps)
    if policy.evicts:
        per_slot = kv_per_token + rows * heads * (8 + 4 * len(policy.state)) + rows  # times int64, state float32
        if bench.sizes.positions == "reindex" and elem < 4:  # half precision reindex keeps the model's keys too,
            per_slot += rows * heads * (shape["head_dim"] * elem + 4)  # and the positions they are rotated at (int32)
        # preallocated buffers: after a prefill longer than budget + buffer, budget + buffer + 1 slots (the decode
        # token's), written in place by every later step
        slots = policy.budget + buffer + 1 if context > policy.budget + buffer else kept
        expected = layers * (slots * per_slot + rows * 8)
    else:
        expected = layers * kept * kv_per_token
    full = layers * seen * kv_per_token

    assert cache.kept_lengths() == [kept] * layers, f"{name}: layers keep {cache.kept_lengths()}, expected {kept}"
    assert cache.kv_bytes() == expected, f"{name}: kv_bytes {cache.kv_bytes()} != {expected} computed"
    if policy.evicts:
        assert kept < seen and cache.kv_bytes() < full, f"{name}: {cache.kv_bytes()} bytes, full cache {full}"
    benchmark.extra_info.update(bench.info(
        model, name, measure="memory", context_tokens=context, decode_steps=steps, batch=rows, buffer=buffer,
        kept_tokens=kept, kv_bytes=cache.kv_bytes(), kv_bytes_full_cache=full, kv_bytes_per_token=layers * kv_per_token,
        peak_mem_bytes=peak, peak_mem_kind=kind, baseline_bytes=baseline, peak_over_baseline_bytes=peak - baseline))
