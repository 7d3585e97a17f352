"""The joint criterion (h2o.eval.selection) and `h2o choose` over results written as the commands write them."""

import json

import pytest

from h2o.eval import cli, selection


def ppl_row(text, family, budget, ppl, gap=None, high=None):
    return {"text": text, "genre": "prose", "family": family, "budget": budget, "ppl": ppl, "gap_closed": gap,
            "gap_low": None if high is None else high - 0.5, "gap_high": high,
            "gap_interval": "–" if high is None else f"[{high - 0.5:.2f}, {high:.2f}]"}


def task_row(task, phrasing, policy, solved, control=10):
    return {"task": task, "phrasing": phrasing, "policy": policy, "budget": "20%", "policy_solved": solved,
            "control": control, "kept_share": None if policy == "full" else solved / control, "interval": "[x, y]"}


def pair(task, phrasing, a, b, verdict, p=0.5):
    return {"task": task, "phrasing": phrasing, "budget": "20%", "policy_a": a, "policy_b": b, "p_value": p,
            "verdict": verdict}


SWEEP = [ppl_row("t1", "full", None, 10.0), ppl_row("t1", "streaming", 128, 12.0),
         ppl_row("t1", "a", 128, 11.0, 0.5, 0.8), ppl_row("t1", "b", 128, 10.5, 0.75, 0.9),
         ppl_row("t2", "full", None, 10.0), ppl_row("t2", "streaming", 128, 10.01),  # no gap on t2
         ppl_row("t2", "a", 128, 10.00), ppl_row("t2", "b", 128, 10.02),
         ppl_row("held", "full", None, 10.0), ppl_row("held", "streaming", 128, 12.0),
         ppl_row("held", "a", 128, 12.5, -0.25, -0.1), ppl_row("held", "b", 128, 11.0, 0.5, 0.7)]
SUMMARY = [task_row("passkey", p, pol, n) for p, row in
           (("restate", {"streaming": 2, "a": 3, "b": 5}), ("all", {"streaming": 4, "a": 6, "b": 9}))
           for pol, n in row.items()]


def test_ppl_cells_compare_gaps_and_where_there_is_no_gap_the_perplexities():
    cells = {(c["candidate"], c["where"]): c for c in selection.ppl_cells(SWEEP, ["a", "b"], "streaming", {"t1", "t2"})}
    assert not cells["a", "t1 @ 128"]["below"] and cells["a", "t1 @ 128"]["split"] == selection.TUNING
    assert not cells["a", "t2 @ 128"]["below"] and cells["b", "t2 @ 128"]["below"]  # 10.02 > 10.01, no gap there
    assert cells["b", "t2 @ 128"]["value"] is None and "no gap" in cells["b", "t2 @ 128"]["shown"]
    held = cells["a", "held @ 128"]
    assert held["split"] == selection.HELD_OUT and held["below"] and held["surely_below"]


def test_task_cells_count_kept_cases_and_take_the_paired_verdict():
    paired = [pair("passkey", "restate", "streaming", "a", "not separated"),
              pair("passkey", "all", "a", "streaming", "streaming better", 0.01)]
    summary = [r if r["policy"] != "a" or r["phrasing"] != "all" else {**r, "policy_solved": 3, "kept_share": 0.3}
               for r in SUMMARY]
    cells = {(c["candidate"], c["where"]): c for c in
             selection.task_cells(summary, paired, "streaming", selection.TUNING, ["a", "b"], "streaming")}
    restate, pooled = cells["a", "passkey / streaming / restate @ 20%"], cells["a", "passkey / streaming / all @ 20%"]
    assert not restate["below"] and not restate["surely_below"] and restate["shown"] == "3/10 vs 2/10"
    assert pooled["below"] and pooled["surely_below"] and pooled["pooled"] and pooled["p_value"] == 0.01


def test_the_criterion_takes_the_best_worst_case_gap_among_candidates_never_below():
    cells = selection.ppl_cells(SWEEP, ["a", "b"], "streaming", {"t1", "t2"})
    cells += selection.task_cells(SUMMARY, [], "question-aware", selection.TUNING, ["a", "b"], "streaming")
    rows, chosen, notes = selection.choose(cells, ["a", "b"])
    # b closes more of the gap on t1 but is above StreamingLLM's PPL on the no-gap text t2: not eligible
    assert chosen == "a" and not notes
    by = {r["candidate"]: r for r in rows}
    assert by["a"]["verdict"] == "eligible" and by["a"]["rank"] == 1 and by["a"]["worst_gap"] == 0.5
    assert by["b"]["below"] == 1 and by["b"]["rank"] is None and "t2 @ 128" in by["b"]["below_where"]
    assert by["a"]["held_out_below"] == 1 and by["a"]["held_out_surely_below"] == 1  # reported, never used


def test_when_every_candidate_is_below_somewhere_the_fallback_says_so_and_skips_the_surely_below():
    cells = [{"candidate": "a", "kind": "tasks", "split": selection.TUNING, "where": "x", "shown": "1/7 vs 2/7",
              "below": True, "surely_below": False, "value": 1 / 7, "pooled": False},
             {"candidate": "b", "kind": "tasks", "split": selection.TUNING, "where": "y", "shown": "0/9 vs 6/9",
              "below": True, "surely_below": True, "value": 0.0, "pooled": False},
             {"candidate": "c", "kind": "tasks", "split": selection.TUNING, "where": "x", "shown": "1/7 vs 2/7",
              "below": True, "surely_below": False, "value": 1 / 7, "pooled": False},
             {"candidate": "c", "kind": "tasks", "split": selection.TUNING, "where": "z", "shown": "1/7 vs 2/7",
              "below": True, "surely_below": False, "value": 1 / 7, "pooled": False}]
    rows, chosen, notes = selection.choose(cells, ["a", "b", "c"])
    assert chosen == "a" and "no candidate met the criterion" in notes[0]
    by = {r["candidate"]: r for r in rows}
    assert by["b"]["rank"] is None and by["b"]["verdict"].startswith("not eligible: surely below")
    assert by["c"]["rank"] == 2  # two cells below against a's one


def test_no_tuning_cell_is_an_error():
    with pytest.raises(ValueError, match="no tuning cell"):
        selection.choose([], ["a"])


# --- `h2o choose` ---------------------------------------------------------------------------------

def write(path, command, model="smollm2-135m", **fields):
    path.mkdir(parents=True, exist_ok=True)
    (path / f"{command}.json").write_text(json.dumps({"command": command, "model": {"name": model}, **fields}))
    return str(path)


def test_choose_reads_the_commands_outputs_and_writes_its_table(tmp_path, capsys):
    sweep = write(tmp_path / "sweep", "sweep", ppl_rows=SWEEP)
    qa = write(tmp_path / "qa", "tasks", protocol="question-aware", summary=SUMMARY, paired=[])
    st = write(tmp_path / "st", "tasks", protocol="streaming", summary=SUMMARY, paired=[])
    out = tmp_path / "out"
    assert cli.main(["choose", "--sweep", sweep, "--tasks", qa, st, "--tuning-texts", "t1", "t2", "--out", str(out),
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "chosen: a" in text and "t2 @ 128" in text
    record = json.loads((out / "choose.json").read_text())
    assert record["chosen"] == "a" and {c["candidate"] for c in record["candidates"]} == {"a", "b"}
    assert (out / "choose.csv").exists() and (out / "choose_cells.csv").exists() and (out / "choose.png").exists()
    protocols = {c["protocol"] for c in record["cells"] if c["kind"] == "tasks"}
    assert protocols == {"question-aware", "streaming"}


def test_choose_over_two_models_takes_one_rule_never_below_on_either(tmp_path, capsys):
    """Alone, model one picks a (below nowhere; b is below on its t2). On model two a is below on t1 and t2, b on
    neither: together no candidate is below nowhere, and the fallback takes b (1 cell below against 2): every
    model's cells enter one criterion, each named by its model."""
    other = [dict(r) for r in SWEEP]
    for r in other:
        if r["text"] == "t1" and r["family"] == "a":
            r.update(ppl=13.0, gap_closed=-0.5, gap_high=0.2, gap_interval="[-1.0, 0.2]")
        if r["text"] == "t2":
            r.update(ppl={"a": 10.05, "b": 10.0}.get(r["family"], r["ppl"]))
    out = tmp_path / "out"
    argv = ["choose", "--sweep", write(tmp_path / "s1", "sweep", ppl_rows=SWEEP),
            write(tmp_path / "s2", "sweep", model="gemma3-270m", ppl_rows=other),
            "--tasks", write(tmp_path / "q1", "tasks", protocol="question-aware", summary=SUMMARY, paired=[]),
            write(tmp_path / "q2", "tasks", model="gemma3-270m", protocol="question-aware", summary=SUMMARY, paired=[]),
            "--tuning-texts", "t1", "t2", "--out", str(out), "--no-progress"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    record = json.loads((out / "choose.json").read_text())
    assert record["chosen"] == "b" and "models smollm2-135m, gemma3-270m" in text
    rows = {r["candidate"]: r for r in record["candidates"]}
    assert (rows["a"]["below"], rows["b"]["below"]) == (2, 1) and rows["a"]["tuning_cells"] == 2 * (2 + 2)
    assert rows["a"]["worst_gap"] == -0.5 and rows["b"]["worst_gap"] == 0.75
    assert "no candidate met the criterion" in text
    assert {c["model"] for c in record["cells"]} == {"smollm2-135m", "gemma3-270m"}
    assert "gemma3-270m: t1 @ 128" in {c["where"] for c in record["cells"] if c["candidate"] == "a" and c["below"]}


@pytest.mark.parametrize("case, message", [
    ("other model", "different models"),
    ("unknown text", "--tuning-texts nope: not a text"),
    ("no reference", "the reference 'streaming' was not measured"),
    ("missing candidate", "candidate 'b' was not measured in"),
    ("wrong command", "written by `h2o sweep`, not `h2o tasks`"),
    ("two sweeps of one model", "two sweeps measured smollm2-135m: give one sweep per model"),
    ("a model without tasks", "no --tasks run measured gemma3-270m"),
])
def test_choose_refuses_inputs_that_cannot_be_compared(case, message, tmp_path, capsys):
    sweep = write(tmp_path / "sweep", "sweep", ppl_rows=SWEEP)
    summary = SUMMARY
    if case == "no reference":
        summary = [r for r in SUMMARY if r["policy"] != "streaming"]
    if case == "missing candidate":
        summary = [r for r in SUMMARY if r["policy"] != "b"]
    qa = write(tmp_path / "qa", "tasks", model="other" if case == "other model" else "smollm2-135m",
               protocol="question-aware", summary=summary, paired=[])
    sweeps = [sweep]
    if case == "two sweeps of one model":
        sweeps.append(write(tmp_path / "sweep2", "sweep", ppl_rows=SWEEP))
    if case == "a model without tasks":
        sweeps.append(write(tmp_path / "sweep2", "sweep", model="gemma3-270m", ppl_rows=SWEEP))
    argv = ["choose", "--sweep", *sweeps, "--tasks", sweep + "/sweep.json" if case == "wrong command" else qa,
            "--tuning-texts", "nope" if case == "unknown text" else "t1", "--out", str(tmp_path / "out")]
    if case == "missing candidate":
        argv += ["--candidates", "a", "b"]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
