"""The command skeleton: the extras check before any work, shared refusals, the one memory meter."""

import importlib.util
import json

import pytest
import torch

from h2o.eval import cli, memory, options


def test_missing_eval_extras_stop_every_command_before_any_work(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "out"
    assert cli.main(["bench", "--model", "random:tiny-llama", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "missing: matplotlib" in err and "pip install 'h2o-kvcache[eval]'" in err
    assert not out.exists()


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c not in cli.NO_MODEL
                                     and "--buffer" not in options.NOT_TAKEN.get(c, ())])
def test_a_negative_buffer_is_refused_before_the_model_loads(command, monkeypatch, tmp_path, capsys):
    from h2o.eval import checkpoints
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert cli.main([command, "--model", "random:tiny-llama", "--buffer", "-5", "--out", str(out)]) == 2
    assert "--buffer must be >= 0, got -5" in capsys.readouterr().err
    assert not out.exists()


def test_every_json_output_carries_the_run_record(tmp_path):
    out = tmp_path / "out"
    assert cli.main(["heatmap", "--model", "random:tiny-llama", "--tokens", "16", "--top-k", "2", "--out", str(out),
                     "--no-progress"]) == 0
    record = json.loads((out / "heatmap.json").read_text())
    assert record["command"] == "heatmap" and record["args"]["tokens"] == 16 and "module" not in record["args"]
    assert record["model"]["name"] == "random:tiny-llama" and record["environment"]["torch"] == torch.__version__
    assert record["wall_time_s"] > 0


def test_a_failed_run_leaves_no_empty_output_directory(tmp_path, capsys, monkeypatch):
    from h2o.eval.commands import heatmap
    monkeypatch.setattr(heatmap, "check_layers", lambda *a: (_ for _ in ()).throw(ValueError("boom")))
    out = tmp_path / "new"
    assert cli.main(["heatmap", "--model", "random:tiny-llama", "--out", str(out)]) == 2
    assert "boom" in capsys.readouterr().err and not out.exists()


def test_nested_peak_meters_both_see_the_peak():
    cpu = torch.device("cpu")
    outer = memory.PeakMemory(cpu).start()
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
    block.fill_(1)
    del block
    inner = memory.PeakMemory(cpu).start()  # resets the process-wide peak counter
    inner_peak, kind = inner.stop()
    outer_peak, _ = outer.stop()
    assert kind in ("peak_rss", "peak_rss_sampled")
    if kind == "peak_rss":  # exact counter: the outer meter kept the 64 MiB the inner reset would have lost
        assert outer.growth >= 60 << 20
        assert inner.growth < 60 << 20
    assert outer_peak >= inner_peak


def test_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    """A run that fails after staging an output leaves neither it nor the staging folder; a good run moves all."""
    from h2o.eval import session
    out = tmp_path / "out"
    out.mkdir()
    (out / "heatmap.csv").write_text("an earlier run\n")
    real_plot = session.Session.plot

    def failing_plot(self, name, figure):
        real_plot(self, name, figure)
        raise ValueError("disk full")

    monkeypatch.setattr(session.Session, "plot", failing_plot)
    argv = ["heatmap", "--model", "random:tiny-llama", "--tokens", "16", "--top-k", "2", "--out", str(out),
            "--no-progress"]
    assert cli.main(argv) == 2
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.csv"]  # only the earlier run's file, untouched
    assert (out / "heatmap.csv").read_text() == "an earlier run\n"
    monkeypatch.setattr(session.Session, "plot", real_plot)
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["heatmap.csv", "heatmap.json", "heatmap_layer0.png",
                                                     "heatmap_layer1.png"]
