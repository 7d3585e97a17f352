"""`h2o tasks`: the full-cache control, the two single-question protocols, every refusal, and the embedded model
(the multi-question protocols: tests/test_multi_question.py)."""

import csv
import importlib.util
import json

import pytest

import h2o
from h2o.eval import answers, checkpoints, cli, retrieval

EMBEDDED_MISSING = importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None


def h2o_tasks(*argv) -> int:
    try:
        return cli.main(["tasks", *map(str, argv), "--no-progress"])
    except SystemExit as exit:  # argparse's own errors
        return exit.code


def _case(task="passkey", index=0, depth=0.5, phrasing="restate"):
    return retrieval.Case(task=task, length=100, depth=depth, index=index, seed=0, source="test", prefix="p ",
                          context="c", suffix=" s", references=("12345",), needles=("n",), max_new_tokens=4,
                          scorer="first_number", phrasing=phrasing)


def test_a_policy_never_scores_on_a_case_the_full_cache_failed(monkeypatch):
    # Scripted answers: the full cache fails case 1; the policy "solves" exactly that case and fails case 0.
    scripted = {("full", 0): 1.0, ("full", 1): 0.0, ("full", 2): 1.0,
                ("streaming_4_12", 0): 0.0, ("streaming_4_12", 1): 1.0, ("streaming_4_12", 2): 1.0}

    def respond(model, tokenizer, case, policy, protocol, **kw):
        return answers.Answer("x", scripted[policy, case.index], 100, 16 if policy != "full" else 99, policy != "full")

    monkeypatch.setattr(answers, "respond", respond)
    monkeypatch.setattr(answers.h2o, "restore", lambda model: None)
    rows = answers.run_cases(None, None, [_case(index=i) for i in range(3)],
                           [answers.Variant("streaming_4_12", "16", name="streaming_4_12")], "question-aware",
                           chunk=8, positions="original", buffer=0)
    summary, notes = answers.summarize(rows, min_solved=2)
    full, policy = summary
    assert (full["policy"], full["full_solved"], full["cases"]) == ("full", 2, 3)
    # solved 2 of 3 cases in raw terms, but only 1 of the 2 the full cache solved
    assert policy["policy_accuracy"] == pytest.approx(2 / 3)
    assert (policy["policy_solved"], policy["full_solved"], policy["kept_share"]) == (1, 2, 0.5)
    assert not notes
    summary, notes = answers.summarize(rows, min_solved=3)  # the full cache solved too few: no score at all
    assert summary[1]["kept_share"] is None
    # 2 of 3: the model does the task, the run was too small (issue 42: not "the model cannot do this task")
    assert "solved 2 of 3 cases" in notes[0] and "too few cases to score; run more (--cases" in notes[0]
    assert answers.compare(rows, min_solved=3) == []  # an unscored task gets no paired test either
    assert answers.compare(rows, min_solved=2)
    full_row = next(r for r in summary if r["policy"] == "full")
    assert full_row["interval"] is None and full_row["full_interval"].startswith("[")  # one meaning per column
    assert "rarely solves" in answers.unscored_note("passkey", "restate", 1, 6, "1000", 5)


def test_phrasings_are_summarised_each_and_pooled_with_intervals_and_paired_tests(monkeypatch):
    # 8 cases in each of two phrasings; the full cache solves all; policy a solves all 16, b only in "completion"
    solved = {"full": lambda c: True, "streaming_4_12": lambda c: True, "tova_4_4_16": lambda c: c.phrasing == "completion"}

    def respond(model, tokenizer, case, policy, protocol, **kw):
        return answers.Answer("x", float(solved[policy](case)), 100, 16 if policy != "full" else 99, policy != "full")

    monkeypatch.setattr(answers, "respond", respond)
    monkeypatch.setattr(answers.h2o, "restore", lambda model: None)
    cases = [_case(index=i, phrasing=p) for p in ("restate", "completion") for i in range(8)]
    variant_list = [answers.Variant(n, "16", name=n) for n in ("streaming_4_12", "tova_4_4_16")]
    rows = answers.run_cases(None, None, cases, variant_list, "question-aware", chunk=8, positions="original",
                             buffer=0)
    summary, _ = answers.summarize(rows, min_solved=1)
    assert [(r["phrasing"], r["policy"]) for r in summary] == [
        (p, q) for p in ("restate", "completion", "all") for q in ("full", "streaming_4_12", "tova_4_4_16")]
    at = {(r["phrasing"], r["policy"]): r for r in summary}
    assert (at["all", "tova_4_4_16"]["policy_solved"], at["all", "tova_4_4_16"]["control"]) == (8, 16)
    assert at["restate", "tova_4_4_16"]["kept_share"] == 0.0 and at["completion", "tova_4_4_16"]["kept_share"] == 1.0
    for r in summary:
        if r["policy"] != "full":  # the Wilson interval holds the share
            assert r["kept_low"] <= r["kept_share"] <= r["kept_high"] and r["interval"].startswith("[")
    assert at["all", "full"]["full_low"] > 0.75 and at["all", "full"]["full_high"] == 1.0
    paired = {(c["phrasing"], c["policy_a"], c["policy_b"]): c for c in answers.compare(rows)}
    # in "restate" a beats b on all 8 (p = 2 / 2^8); in "completion" they tie; pooled, a still wins
    assert paired["restate", "streaming_4_12", "tova_4_4_16"]["verdict"] == "streaming_4_12 better"
    assert paired["restate", "streaming_4_12", "tova_4_4_16"]["p_value"] == pytest.approx(2 / 2 ** 8)
    assert paired["completion", "streaming_4_12", "tova_4_4_16"]["verdict"] == "not separated"
    assert paired["all", "streaming_4_12", "tova_4_4_16"]["a_only"] == 8 and paired["all", "streaming_4_12", "tova_4_4_16"]["b_only"] == 0
    assert paired["all", "full", "streaming_4_12"]["verdict"] == "not separated"
    assert paired["all", "full", "tova_4_4_16"]["verdict"] == "full better"
    note = answers.supported_note([c for c in answers.compare(rows) if c["phrasing"] == "all"], "passkey kept")
    assert "streaming_4_12 better than tova_4_4_16 (16 vs 8 of 16" in note and "1 of 3 pairs not separated" in note


def test_a_case_that_never_evicted_is_not_scored(monkeypatch):
    def respond(model, tokenizer, case, policy, protocol, **kw):
        return answers.Answer("x", 1.0, 100, 99, False)  # the policy kept everything

    monkeypatch.setattr(answers, "respond", respond)
    monkeypatch.setattr(answers.h2o, "restore", lambda model: None)
    rows = answers.run_cases(None, None, [_case()], [answers.Variant("streaming", "20%", ratio=0.2)], "streaming",
                           chunk=8, positions="original", buffer=0)
    summary, notes = answers.summarize(rows, min_solved=1)
    assert summary[1]["not_compressed"] == 1 and summary[1]["policy_solved"] == 0 and summary[1]["kept_share"] is None
    assert "never made the cache evict" in notes[0]


def test_families_are_sized_by_budget_or_ratio():
    v = answers.variants(["full", "streaming", "h2o_sum", "h2o_4_8_64"], None, [0.2], None)
    assert [(x.label, x.budget) for x in v] == [("streaming", "20%"), ("h2o_sum", "20%"), ("h2o_4_8_64_mean", "64")]
    assert v[0].policy(1000) == "streaming_4_196" and v[1].policy(1000) == "h2o_4_25_200_sum"
    v = answers.variants(["h2o"], [128], None, "sum")
    assert [x.policy(5000) for x in v] == ["h2o_4_16_128_sum"]


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "needle"], "unknown task 'needle'"),
    (["--depths", "1.5"], "--depths must lie in [0, 1], got 1.5"),
    (["--depths", "-0.1"], "--depths must lie in [0, 1], got -0.1"),
    (["--cases", "0"], "--cases must be >= 1, got 0"),
    (["--lengths", "300", "--budget-ratio", "0.8"], "holds the whole 300-token prompt"),
    (["--lengths", "1000", "--policies", "streaming_4_1000"], "holds the whole 1000-token prompt"),
    (["--budget-ratio", "1.5"], "--budget-ratio must lie in (0, 1)"),
    (["--protocol", "oneshot"], "invalid choice: 'oneshot'"),
    (["--text-file", "/no/such/file.txt"], "no text file at /no/such/file.txt"),
    (["--lengths", "9000"], "pass the model's trained context of 8192"),
])
def test_bad_input_is_refused_before_the_model_loads(monkeypatch, tmp_path, capsys, argv, message):
    if EMBEDDED_MISSING and "8192" in message:
        pytest.skip("the trained context comes from the embedded model's config")
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert h2o_tasks("--out", out, *argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_random_weight_model_is_refused(tmp_path, capsys):
    assert h2o_tasks("--model", "random:tiny-llama", "--out", tmp_path / "out") == 2
    assert "random weights and no tokenizer" in capsys.readouterr().err


# --- on the embedded model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedded():
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    model, tokenizer = checkpoints.load_model()
    from h2o.eval import data
    haystacks = {"pg19/10146": data.load_document("pg19", "10146")[0]}
    yield model, tokenizer, haystacks
    h2o.restore(model)


@pytest.mark.slow
@pytest.mark.parametrize("protocol", retrieval.SINGLE_PROTOCOLS)
def test_full_cache_finds_the_passkey_and_a_window_that_cannot_hold_it_does_not(embedded, protocol):
    model, tokenizer, haystacks = embedded
    case = retrieval.generate_cases("passkey", tokenizer, haystacks, [600], [0.2], 1, seed=0)[0]
    full = answers.respond(model, tokenizer, case, "full", protocol, chunk=128, buffer=0)
    assert full.solved, f"full cache answered {full.text!r}, expected {case.references[0]}"
    assert full.kept_tokens == full.prompt_tokens - 1 and not full.compressed
    # sinks 4 + the last 60 tokens: the needle (at 20% of ~600 tokens) is evicted before the question is asked
    window = answers.respond(model, tokenizer, case, "streaming_4_60", protocol, chunk=128, buffer=0)
    assert window.compressed and window.kept_tokens == 64
    assert not window.solved, f"a 64-token window answered {window.text!r}: eviction was not in force"
    layers = model.config.num_hidden_layers  # the answer's tokens: all held in every layer, then none
    assert full.answer_held == [1.0] * layers and window.answer_held == [0.0] * layers
    assert window.kept_per_layer == [64] * layers and full.kept_per_layer == [full.prompt_tokens - 1] * layers


def test_the_answer_positions_spell_the_answer_in_every_needle_statement(embedded):
    model, tokenizer, haystacks = embedded
    for task in ("passkey", "niah_multikey", "niah_multivalue"):
        case = retrieval.generate_cases(task, tokenizer, haystacks, [600], [0.5], 1, seed=0)[0]
        prefix, context, _ = retrieval.case_token_ids(tokenizer, case)
        where = retrieval.answer_positions(tokenizer, case, len(prefix))
        ids = prefix + context
        spelled = tokenizer.decode([ids[i] for i in where]).replace(" ", "")
        said = sum(n.count(ref) for n in case.needles for ref in case.references)
        assert said >= len(case.references) and all(ref in spelled for ref in case.references), (task, spelled)
        assert all(len(prefix) <= i < len(ids) for i in where)
        # every token is inside an answer: the digits alone, said as often as the needles say them
        assert len(spelled) == sum(len(ref) * n.count(ref) for n in case.needles for ref in case.references), spelled


@pytest.mark.slow
def test_tasks_command_end_to_end(tmp_path, capsys):
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    out = tmp_path / "out"
    assert h2o_tasks("--tasks", "passkey", "--lengths", 300, "--depths", 0.3, 0.7, "--cases", 1, "--policies", "streaming",
                     "h2o_4_8_64", "--budget-ratio", 0.2, "--buffer", 0, "--min-solved", 1, "--phrasings", "restate",
                     "completion", "--out", out) == 0
    for name in ("tasks.csv", "tasks_cases.csv", "tasks_paired.csv", "tasks.json", "tasks_kept_share.png",
                 "tasks_passkey_grid.png"):
        assert (out / name).stat().st_size > 0
    summary = list(csv.DictReader(open(out / "tasks.csv")))
    assert [(r["phrasing"], r["policy"], r["budget"]) for r in summary] == [
        (p, *q) for p in ("restate", "completion", "all")
        for q in (("full", "–"), ("streaming", "20%"), ("h2o_4_8_64_mean", "64"))]
    assert [r["cases"] for r in summary] == ["2"] * 6 + ["4"] * 3
    summary = [r for r in summary if r["phrasing"] == "all"]
    cases = list(csv.DictReader(open(out / "tasks_cases.csv")))
    assert {r["policy_name"] for r in cases} == {"full", "streaming_4_56", "h2o_4_8_64_mean"}  # 20% of 300 tokens
    assert all(float(c["answer_held"]) == 1.0 for c in cases if c["policy"] == "full")
    for c in cases:
        held = [float(x) for x in c["answer_held_per_layer"].split()]
        assert len(held) == 30 and 0 <= min(held) <= max(held) <= 1
        assert abs(float(c["answer_held"]) - sum(held) / 30) <= 0.005  # the per-layer shares are given to 2 decimals
        assert len(c["kept_per_layer"].split()) == 30
    for r in summary[1:]:
        control = [c for c in cases if c["policy"] == r["policy"] and c["full_solved"] == "True"]
        assert int(r["policy_solved"]) == sum(c["solved"] == "True" for c in control)
    record = json.loads((out / "tasks.json").read_text())
    assert record["command"] == "tasks" and record["protocol"] == "question-aware"
    assert len(record["cases"]) == 12 and record["paired"]
    assert {(c["phrasing"], c["policy_a"], c["policy_b"]) for c in record["paired"]} >= {
        ("all", "full", "streaming"), ("restate", "full", "streaming"), ("completion", "full", "streaming")}
    printed = capsys.readouterr().out
    assert "| Task" in printed and "protocol question-aware (one prefill)" in printed and "McNemar" in printed
