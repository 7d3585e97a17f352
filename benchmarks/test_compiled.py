"""TPOT of the compiled decode step: h2o's static layout against transformers' compiled StaticCache.

Each compressed policy of the sizes runs in the static layout (`h2o.make_cache(..., static=True)`) through
`torch.compile(model.forward, fullgraph=True)` (CUDA: mode reduce-overhead, i.e. CUDA graphs; CPU: inductor's
default), and so does transformers' `StaticCache` of the same capacity (budget + buffer + 1 slots, what every
compiled step attends): the floor a compiled compressed step can reach. The prompt (`compiled_context` tokens)
is prefilled eagerly; 3 untimed steps compile and warm up; then every round is one decode step. No graph may be
compiled during the timed rounds (dynamo's counters): a recompile would put compile time into TPOT.
Between rounds (untimed) the StaticCache, once full, is reset and prefilled again with the prompt's last
`budget` tokens, so it holds budget .. capacity tokens, as the compressed caches do.
"""

import pytest
import torch

import h2o
from h2o.eval.compiled import CompiledRunner, default_mode, graphs_compiled

pytestmark = pytest.mark.gpu
WARMUP = 3


@pytest.fixture(params=["streaming", "h2o", "full"])
def compiled_name(request, bench):
    names = {h2o.parse(p).name.split("_")[0]: p for p in bench.sizes.policies}
    return names[request.param]


def test_tpot_compiled(benchmark, bench, speed_model, prompt_ids, compiled_name):
    model, _ = speed_model
    sizes, device = bench.sizes, bench.device
    budget = max(h2o.parse(p).budget or 0 for p in sizes.policies)
    mode = default_mode(device)
    runner = CompiledRunner(model, compiled_name, budget, sizes.buffer, mode, "inductor")
    prompt = prompt_ids[:, :sizes.compiled_context].to(device)
    state = {}
    with torch.no_grad():
        state["token"] = runner.warm_up(runner.prefill(prompt), prompt, WARMUP, device)
    graphs = graphs_compiled()

    def ready():  # untimed: a full StaticCache is prefilled again here
        with torch.no_grad():
            state["token"] = runner.ready(state["token"], prompt)
        return (), {}

    def decode():
        with torch.no_grad():
            state["token"] = runner.step(state["token"])
        bench.sync()

    benchmark.pedantic(decode, setup=ready, rounds=sizes.tpot_rounds, iterations=1)
    assert graphs_compiled() == graphs, "a graph was compiled during the timed steps"
    benchmark.extra_info.update(bench.info(
        model, compiled_name, measure="tpot_compiled", context_tokens=sizes.compiled_context, decode_steps=sizes.tpot_rounds,
        warmup_steps=WARMUP, batch=1, buffer=sizes.buffer, compile_mode=mode, compile_s=runner.compile_s,
        attended_slots=runner.capacity, cache="StaticCache" if compiled_name == "full" else "h2o static",
        positions="original"))
