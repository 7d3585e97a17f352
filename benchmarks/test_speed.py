"""TTFT and TPOT per policy, timed by pytest-benchmark.

TTFT: the prefill forward over the whole prompt plus picking the first token, with a fresh cache
each round (for H2O this includes scoring the prompt and the first eviction).
TPOT: consecutive decode steps of one generation after the prompt, one round per step. With lazy
eviction a compressed cache evicts once every `buffer + 1` steps, so the rounds are a multiple of
that: the mean is the amortised cost of a step, eviction included (the median is a step without one).
The full cache at a budget's length is timed too: it is the floor a compressed step can reach.
"""

import pytest

import h2o

pytestmark = pytest.mark.gpu


def test_ttft(benchmark, bench, speed_model, prompt_ids, case):
    policy, context, batch = case
    model, _ = speed_model
    ids = prompt_ids[:, :context].expand(batch, -1)
    last = {}

    def fresh_cache():
        last["cache"] = h2o.make_cache(model, policy, positions=bench.sizes.positions, buffer=bench.sizes.buffer)
        return (last["cache"],), {}

    benchmark.pedantic(lambda cache: bench.step(model, ids, cache), setup=fresh_cache,
                       rounds=bench.sizes.ttft_rounds, warmup_rounds=bench.sizes.ttft_warmup, iterations=1)
    cache = last["cache"]
    benchmark.extra_info.update(bench.info(
        model, policy, measure="ttft", context_tokens=context, batch=batch, buffer=bench.sizes.buffer,
        kv_bytes=cache.kv_bytes(), kept_tokens=max(cache.kept_lengths())))


def test_tpot(benchmark, bench, speed_model, prompt_ids, speed_case):
    policy, context, batch = speed_case
    model, _ = speed_model
    cache = h2o.make_cache(model, policy, positions=bench.sizes.positions, buffer=bench.sizes.buffer)
    state = {"token": bench.step(model, prompt_ids[:, :context].expand(batch, -1), cache)}

    def decode():
        state["token"] = bench.step(model, state["token"], cache)

    rounds = bench.sizes.tpot_rounds
    benchmark.pedantic(decode, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(bench.info(
        model, policy, measure="tpot", context_tokens=context, decode_steps=rounds, warmup_steps=1, batch=batch,
        buffer=bench.sizes.buffer, kv_bytes=cache.kv_bytes(), kept_tokens=max(cache.kept_lengths())))
