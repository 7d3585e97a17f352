"""PPL regression gate, with eviction really in force.

Protocol (the same on every device, so the gates below hold wherever it runs): the first 2048
tokens (no BOS) of WikiText-2 test and of PG-19 test book 10146, batched as two rows of one
tensor, fed 32 tokens per forward (`chunked-32`: every forward scores 32 tokens over the
compressed cache, which is then cut back; lazy buffer 64), original positions, float32. Each
compressed policy runs on the same ids as the full cache, in the same session, and must show
different losses once it has evicted (`check_eviction_in_force`).

Gates, per corpus, on the PPL over all 2047 scored tokens:
1. every compressed policy's PPL <= TOLERANCE x the full cache's;
2. H2O with the scoring rule the README recommends (h2o.DEFAULT_SCORE, "mean") against StreamingLLM
   at the same budget: PPL(H2O) <= VS_STREAMING x PPL(StreamingLLM).
The thresholds are what was measured (numbers beside them) plus a stated slack; they were
measured on the embedded SmolLM2-135M and are a claim about it: with --bench-model another model
is held to the same claim, and a failure prints both numbers.
"""

import pytest
import torch

import h2o
from h2o.eval.data import load_document, tokenize
from h2o.eval.ppl import check_eviction_in_force, token_losses

pytestmark = pytest.mark.gpu

CORPORA = ("wikitext", "pg19")  # row order of the ids
TOKENS, CHUNK, BUFFER = 2048, 32, 64
MODE = f"chunked-{CHUNK}"

# Thresholds = the measured ratio + 0.01, rounded up to the next 0.01 (1 to 2 points of slack: room
# for other hardware and kernels, none for a change that moves quality). Measured with
#   .venv/bin/python -m pytest benchmarks/test_ppl.py -m gpu --device cpu -s
# on SmolLM2-135M fp32, CPU, torch 2.13.0, transformers 5.23.0. Full cache: wikitext 15.022, pg19 18.795.
TOLERANCE = {  # max PPL(policy) / PPL(full cache), per corpus
    "streaming_4_252": {"wikitext": 1.77, "pg19": 1.06},      # measured 26.300 (1.751), 19.587 (1.042)
    "h2o_4_32_256_mean": {"wikitext": 1.58, "pg19": 1.05},    # measured 23.495 (1.564), 19.360 (1.030)
    "h2o_4_32_256_sum": {"wikitext": 1.54, "pg19": 1.07},     # measured 22.937 (1.527), 19.846 (1.056)
    "streaming_4_508": {"wikitext": 1.46, "pg19": 1.02},      # measured 21.694 (1.444), 18.979 (1.010)
    "h2o_4_64_512_mean": {"wikitext": 1.24, "pg19": 1.03},    # measured 18.476 (1.230), 19.022 (1.012)
    "streaming_4_1020": {"wikitext": 1.02, "pg19": 1.01},     # measured 15.084 (1.004), 18.778 (0.999)
    "h2o_4_64_1024_mean": {"wikitext": 1.03, "pg19": 1.02},   # measured 15.261 (1.016), 18.908 (1.006)
}
# H2O with the README's scoring rule against StreamingLLM at the same budget: max PPL(H2O) / PPL(StreamingLLM).
# What it says: on WikiText-2, H2O is 11% better at budget 256 and 15% at 512; on PG-19 it does not lose
# at 256 (1.2% better) and is only within 2% at 512 (0.2% worse); at 1024 (half the text) StreamingLLM is
# slightly better on both (1.2%, 0.7%). The paper's summed score loses at 256 on PG-19 (19.846, 1.013).
VS_STREAMING_RULE = "mean"  # the rule these were measured for
VS_STREAMING = {
    ("h2o_4_32_256_mean", "streaming_4_252"): {"wikitext": 0.91, "pg19": 1.00},   # measured 0.893, 0.988
    ("h2o_4_64_512_mean", "streaming_4_508"): {"wikitext": 0.87, "pg19": 1.02},   # measured 0.852, 1.002
    ("h2o_4_64_1024_mean", "streaming_4_1020"): {"wikitext": 1.03, "pg19": 1.02}, # measured 1.012, 1.007
}


class PPLRuns:
    """The session's PPL results, one per policy, all on the same ids."""

    def __init__(self, bench, model, ids, sources):
        self.bench, self.model, self.ids, self.sources = bench, model, ids, sources
        self.results = {}

    def run(self, policy: str):
        name = h2o.parse(policy).name
        self.results[name] = token_losses(self.model, self.ids, name, chunk=CHUNK, buffer=BUFFER, progress=False)
        return self.results[name]

    def get(self, policy: str):
        name = h2o.parse(policy).name
        return self.results[name] if name in self.results else self.run(name)

    def ppl(self, policy: str) -> dict[str, float]:
        result = self.get(policy)
        return {corpus: result.ppl(row) for row, corpus in enumerate(CORPORA)}


@pytest.fixture(scope="session")
def ppl_runs(bench, pytestconfig):
    name = pytestconfig.getoption("bench_model")
    model, tokenizer = bench.load(name, "float32")
    if tokenizer is None:
        pytest.fail(f"--bench-model {name!r} has no tokenizer: PPL needs a pretrained model")
    docs = {corpus: load_document(corpus) for corpus in CORPORA}
    ids = torch.cat([tokenize(tokenizer, docs[corpus][0], TOKENS) for corpus in CORPORA])
    return PPLRuns(bench, model, ids, {corpus: docs[corpus][1] for corpus in CORPORA})


def _fmt(ppl: dict[str, float]) -> str:
    return ", ".join(f"{corpus} {value:.3f}" for corpus, value in ppl.items())


@pytest.mark.parametrize("policy", ["full", *TOLERANCE])
def test_ppl(benchmark, ppl_runs, policy):
    result = benchmark.pedantic(ppl_runs.run, args=(policy,), rounds=1, iterations=1)
    ppl, full = ppl_runs.ppl(policy), ppl_runs.ppl("full")
    print(f"\n{result.policy} [{MODE}, {TOKENS} tokens]: {_fmt(ppl)}; ratio to full: "
          + ", ".join(f"{c} {ppl[c] / full[c]:.3f}" for c in CORPORA))
    benchmark.extra_info.update(ppl_runs.bench.info(
        ppl_runs.model, policy, measure="ppl", mode=result.mode, tokens_per_corpus=TOKENS,
        scored_tokens_per_corpus=result.losses.shape[1], corpora=ppl_runs.sources, buffer=BUFFER,
        positions="original", ppl=ppl, ppl_full_cache=full,
        ppl_after_first_eviction={c: result.ppl(row, after_eviction=True) for row, c in enumerate(CORPORA)},
        first_eviction=result.first_eviction, max_kept=result.max_kept, notes=result.notes,
        tolerance=TOLERANCE.get(result.policy)))
    if result.policy == "full":
        return
    check_eviction_in_force(ppl_runs.get("full"), result)
    failures = [f"{c}: {result.policy} PPL {ppl[c]:.3f} > {TOLERANCE[result.policy][c]} x full-cache PPL "
                f"{full[c]:.3f} = {TOLERANCE[result.policy][c] * full[c]:.3f}"
                for c in CORPORA if ppl[c] > TOLERANCE[result.policy][c] * full[c]]
    assert not failures, f"{MODE}, {TOKENS} tokens: " + "; ".join(failures)


@pytest.mark.parametrize("corpus", CORPORA)
@pytest.mark.parametrize("pair", VS_STREAMING, ids=[f"budget{h2o.parse(s).budget}" for _, s in VS_STREAMING])
def test_recommended_h2o_vs_streaming(ppl_runs, pair, corpus):
    if h2o.DEFAULT_SCORE != VS_STREAMING_RULE:
        pytest.fail(f"h2o.DEFAULT_SCORE is {h2o.DEFAULT_SCORE!r} but these margins were measured for "
                    f"{VS_STREAMING_RULE!r}: measure the new rule against StreamingLLM and update VS_STREAMING")
    ours, streaming = pair
    limit = VS_STREAMING[pair][corpus]
    a, b = ppl_runs.ppl(ours)[corpus], ppl_runs.ppl(streaming)[corpus]
    assert a <= limit * b, (
        f"{corpus}, {MODE}, {TOKENS} tokens: {ours} PPL {a:.3f} vs {streaming} PPL {b:.3f}: "
        f"ratio {a / b:.3f} > {limit}")
