"""Shared setup of the benchmark suites (TPOT, TTFT, peak memory, PPL regression).

    pytest -m gpu --benchmark-json out.json                # on CUDA (skipped, with the reason, without it)
    pytest benchmarks -m gpu --device cpu                  # the same suites on the CPU, CPU-sized
    H2O_BENCH_DEVICE=cpu pytest benchmarks -m gpu          # the same, for wrappers that cannot pass options

Every test here is marked `gpu`, so `pytest -m "not gpu"` (the CPU test suite) deselects them all.
Sizes per device are in `SIZES`; models are loaded once per session.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

import h2o
from h2o.eval.data import load_document, random_ids, tokenize
from h2o.eval.checkpoints import EMBEDDED, describe, load_model

NO_CUDA = "CUDA is not available; run with --device cpu to run these suites on the CPU"


@dataclass(frozen=True)
class Sizes:
    """What the speed and memory suites run on one device (the PPL protocol is the same everywhere)."""

    model: str
    dtype: str
    policies: tuple[str, ...]
    contexts: tuple[int, ...]  # prompt lengths for TTFT, TPOT and memory
    references: tuple[tuple[str, int], ...]  # full cache at a budget's length: the floor a compressed step can reach
    ttft_rounds: int
    ttft_warmup: int  # prefills before the timed ones (CUDA: kernel selection, allocator)
    tpot_rounds: int  # consecutive decode steps; a multiple of buffer + 1 holds whole eviction cycles
    memory_steps: int  # decode steps after the prefill in the memory suite (fewer than the buffer)
    buffer: int = 64  # make_cache's default lazy-eviction slack
    batches: tuple[int, ...] = (1,)  # rows of the speed and memory suites
    batch_max_context: int = 0  # rows > 1 only at contexts up to this (a long prompt x a batch is a long prefill)
    positions: str = "original"  # "reindex" where contexts pass the model's trained context
    compiled_context: int = 4096  # prompt before the compiled decode steps (test_compiled.py; original positions)
    cost_contexts: tuple[int, ...] = (1024, 4096)  # test_cost.py: replaying prefills and allocations' decode steps
    cost_rounds: int = 3  # interleaved prefills of each configuration (test_cost.py)


SIZES = {
    # Real shapes: Pythia-2.8B (32 layers x 32 heads x 80 dims, fp16; random weights, no download), 1k to 32k
    # tokens (positions reindex: past its trained 2048), batch 1 everywhere and batch 4 up to 4k.
    "cuda": Sizes(
        model="random:pythia-2.8b", dtype="float16",
        policies=("full", "streaming_4_252", "h2o_4_32_256"),
        contexts=(1024, 4096, 16384, 32768), references=(("full", 256),),
        ttft_rounds=3, ttft_warmup=1, tpot_rounds=65, memory_steps=8,
        batches=(1, 4), batch_max_context=4096, positions="reindex",
    ),
    # 2 CPU cores: the embedded SmolLM2-135M in fp32, one long-ish context, few rounds (each suite < ~3 min).
    "cpu": Sizes(
        model=EMBEDDED, dtype="float32",
        policies=("full", "streaming_4_252", "h2o_4_32_256"),
        contexts=(2048,), references=(("full", 256),),
        ttft_rounds=2, ttft_warmup=0, tpot_rounds=65, memory_steps=8, compiled_context=2048,
        cost_contexts=(1024,), cost_rounds=2,
    ),
}


def _sizes(config) -> Sizes:
    device = config.getoption("device")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in SIZES:
        raise pytest.UsageError(f"--device {device!r}: use cuda, cuda:N or cpu")
    return SIZES[kind]


def pytest_generate_tests(metafunc):
    """Device-dependent parameters, (policy, context, batch) triples: `case` for every policy at every context
    and batch, `speed_case` adds the full cache at the budgets' lengths (what a compressed decode step can reach)."""
    if "cost_context" in metafunc.fixturenames:
        metafunc.parametrize("cost_context", _sizes(metafunc.config).cost_contexts)
    for name in ("case", "speed_case"):
        if name in metafunc.fixturenames:
            sizes = _sizes(metafunc.config)
            shapes = [(c, b) for c in sizes.contexts for b in sizes.batches if b == 1 or c <= sizes.batch_max_context]
            cases = [(p, c, b) for c, b in shapes for p in sizes.policies]
            if name == "speed_case":
                cases += [(p, c, b) for p, c in sizes.references for b in sizes.batches]
            metafunc.parametrize(name, cases, ids=[f"{p}-{c}" + (f"-b{b}" if b > 1 else "") for p, c, b in cases])


class Bench:
    """The device, its sizes, and the few helpers every suite uses."""

    def __init__(self, device: str, sizes: Sizes):
        self.device, self.sizes = torch.device(device), sizes
        self._models = {}

    def load(self, name: str, dtype: str):
        if (name, dtype) not in self._models:
            model, tokenizer = load_model(name, str(self.device), dtype=dtype)
            self.step(model, torch.zeros(1, 8, dtype=torch.long), h2o.make_cache(model, "full"))  # page in the weights
            self._models[name, dtype] = model, tokenizer
        return self._models[name, dtype]

    def restore_all(self) -> None:
        for model, _ in self._models.values():
            h2o.restore(model)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, model, ids: torch.Tensor, cache) -> torch.Tensor:
        """One forward over `ids` with `cache`, then the next token: prefill (TTFT) or decode step (TPOT).

        Logits of the last position only, as `generate` asks for them (a 2048-token prefill of a
        49k vocabulary would otherwise allocate 400 MB of logits that generation never computes)."""
        with torch.no_grad():
            out = model(ids.to(self.device), past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
        self.sync()
        return token

    def info(self, model, policy: str, **extra) -> dict:
        """What the benchmark JSON's extra_info carries for every result."""
        return {
            "model": describe(model), "device": str(self.device), "device_name": self.device_name(),
            "dtype": str(model.dtype).removeprefix("torch."), "torch": torch.__version__,
            "transformers": transformers.__version__, "h2o": h2o.__version__,
            "threads": torch.get_num_threads(), "policy": h2o.parse(policy).name, "positions": self.sizes.positions,
            **extra,
        }

    def device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return f"cpu ({torch.get_num_threads()} threads)"


@pytest.fixture(scope="session", autouse=True)
def bench(pytestconfig) -> Bench:
    """Skips every benchmark (with the reason) when CUDA is asked for and absent."""
    device = pytestconfig.getoption("device")
    sizes = _sizes(pytestconfig)
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return Bench(device, sizes)


@pytest.fixture(autouse=True)
def _restore_attention(bench):
    """Give every loaded model its own attention back after each test (make_cache switches it)."""
    yield
    bench.restore_all()


@pytest.fixture(scope="session")
def speed_model(bench):
    """(model, tokenizer or None) for the speed and memory suites."""
    return bench.load(bench.sizes.model, bench.sizes.dtype)


@pytest.fixture(scope="session")
def prompt_ids(bench, speed_model) -> torch.Tensor:
    """[1, longest context] prompt: WikiText-2 for a model with a tokenizer, else random ids."""
    model, tokenizer = speed_model
    n = max(*bench.sizes.contexts, bench.sizes.compiled_context)
    if tokenizer is None:
        return random_ids(model.config.vocab_size, n)
    return tokenize(tokenizer, load_document("wikitext")[0], n)
