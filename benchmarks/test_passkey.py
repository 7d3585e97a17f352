"""Retrieval kept share per policy, with the full-cache control (passkey, question-aware protocol).

Protocol: seeded passkey cases (`h2o.eval.retrieval`, PG-19 haystacks) on the embedded SmolLM2-135M
in float32, the whole prompt in one prefill, compressed after it, the last prompt token fed on the
compressed cache, greedy answers (`h2o.eval.answers.respond`). The full cache answers every case
first; a policy's kept share counts only the cases the full cache solved. Each policy's run over all
cases is timed by pytest-benchmark; `extra_info` carries the counts and the kept share.

Gate: the best policy at each budget keeps at least `BEST_KEPT` of the full cache's solved cases
(measured value beside it, minus one case), and the full cache solves at least `MIN_SOLVED`. On this
135M model retrieval after compression is weak (see the README's tasks table): the gate guards
against a regression, not a claim that any rule retrieves well here.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import h2o
from h2o.eval import answers, data, retrieval
from h2o.eval.checkpoints import EMBEDDED

pytestmark = pytest.mark.gpu

BOOKS = ("10146", "10321", "24553")
POLICIES = ("streaming", "h2o_mean", "h2o_sum")
BUFFER = 64


@dataclass(frozen=True)
class TaskSizes:
    length: int
    cases: int  # one per depth, spread over 0.1..0.9
    ratios: tuple[float, ...]  # budgets as shares of the prompt


# The same protocol on every device (a quality figure, like the PPL gates): the gates below hold wherever it runs.
SIZES = {"cpu": TaskSizes(length=768, cases=10, ratios=(0.3,)),
         "cuda": TaskSizes(length=768, cases=10, ratios=(0.3,))}
# Measured with `pytest benchmarks/test_passkey.py -m gpu --device cpu -s` (SmolLM2-135M fp32, CPU, torch 2.13.0,
# transformers 5.23.0): the full cache solved 7 of 10 cases at 768 tokens; at 30% of the prompt StreamingLLM kept
# 2 of those 7 (0.29), H2O mean and sum 1 (0.14). Each gate leaves one case of slack.
MIN_SOLVED = 0.6  # share of the cases the full cache must solve (measured 0.7)
BEST_KEPT = {0.3: 0.14}  # the best policy's kept share at that budget (measured 0.29)


class TaskRuns:
    def __init__(self, model, tokenizer, sizes: TaskSizes):
        self.model, self.tokenizer, self.sizes = model, tokenizer, sizes
        haystacks = {f"pg19/{b}": data.load_document("pg19", b)[0] for b in BOOKS}
        depths = [round(0.1 + 0.8 * i / (sizes.cases - 1), 4) for i in range(sizes.cases)]
        self.cases = retrieval.generate_cases("passkey", tokenizer, haystacks, [sizes.length], depths, 1, seed=0)
        self.full = None
        self.results: dict[tuple[str, float], list[answers.Answer]] = {}

    def control(self) -> list[answers.Answer]:
        if self.full is None:
            self.full = self.answers("full")
        return self.full

    def answers(self, policy: str) -> list[answers.Answer]:
        try:
            return [answers.respond(self.model, self.tokenizer, case, policy, "question-aware", buffer=BUFFER)
                    for case in self.cases]
        finally:
            h2o.restore(self.model)

    def run(self, family: str, ratio: float) -> list[answers.Answer]:
        variant = answers.Variant(family, f"{ratio:.0%}", ratio=ratio)
        self.results[family, ratio] = self.answers(variant.policy(self.sizes.length))
        return self.results[family, ratio]

    def kept(self, family: str, ratio: float) -> tuple[int, int, float]:
        answers = self.results.get((family, ratio)) or self.run(family, ratio)
        control = [a for a, f in zip(answers, self.control()) if f.solved]
        assert all(a.compressed for a in answers), f"{family} at {ratio:.0%}: a case never evicted"
        solved = sum(a.solved for a in control)
        return solved, len(control), solved / len(control)


@pytest.fixture(scope="session")
def task_runs(bench):
    model, tokenizer = bench.load(EMBEDDED, "float32")
    return TaskRuns(model, tokenizer, SIZES[bench.device.type])


def pytest_generate_tests(metafunc):
    """The budgets of the device the suite runs on (--device)."""
    if "ratio" in metafunc.fixturenames:
        try:
            kind = torch.device(metafunc.config.getoption("device")).type
        except RuntimeError:
            kind = "cpu"
        ratios = SIZES.get(kind, SIZES["cpu"]).ratios
        metafunc.parametrize("ratio", ratios, ids=[f"budget{r:.0%}" for r in ratios])


def test_full_cache_control(benchmark, bench, task_runs):
    answers = benchmark.pedantic(task_runs.control, rounds=1, iterations=1)
    solved = sum(a.solved for a in answers)
    benchmark.extra_info.update(bench.info(task_runs.model, "full", measure="passkey", protocol="question-aware",
                                           length=task_runs.sizes.length, cases=len(answers), full_solved=solved))
    assert solved >= MIN_SOLVED * len(answers), (
        f"the full cache solved {solved} of {len(answers)} passkey cases at {task_runs.sizes.length} tokens: "
        "the model cannot do the task there, so no policy can be judged on it")


@pytest.mark.parametrize("family", POLICIES)
def test_kept_share(benchmark, bench, task_runs, family, ratio):
    benchmark.pedantic(task_runs.run, args=(family, ratio), rounds=1, iterations=1)
    solved, control, share = task_runs.kept(family, ratio)
    name = answers.Variant(family, "", ratio=ratio).policy(task_runs.sizes.length)
    print(f"\n{name}: kept {solved}/{control} of the full cache's solved passkey cases ({share:.2f})")
    benchmark.extra_info.update(bench.info(
        task_runs.model, name, measure="passkey", protocol="question-aware", length=task_runs.sizes.length,
        budget_ratio=ratio, cases=len(task_runs.cases), full_solved=control, policy_solved=solved,
        kept_share=share, buffer=BUFFER))


def test_best_policy_keeps_the_passkey(task_runs, ratio):
    kept = {family: task_runs.kept(family, ratio) for family in POLICIES}
    best = max(kept, key=lambda f: kept[f][2])
    assert kept[best][2] >= BEST_KEPT[ratio], (
        f"at {ratio:.0%} of {task_runs.sizes.length} tokens the best policy ({best}) kept {kept[best][0]}/"
        f"{kept[best][1]} = {kept[best][2]:.2f} < {BEST_KEPT[ratio]}; all: {kept}")
