"""The CLI a newcomer trusts: help for every option with its true default, the policy grammar with
examples that parse, a fast `h2o --help`, clear errors before the model loads, merged duplicate
policies, and `h2o bench` outputs that say how they were measured."""

import argparse
import csv
import importlib
import json
import re
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import h2o
from h2o.eval import answers, checkpoints, cli, data
from h2o.eval.commands import bench, stress

ROOT = Path(__file__).resolve().parents[1]
POLICY_NAME = re.compile(r"\b(full|streaming_\d+_\d+|(?:h2o|vatp)_\d+_\d+_\d+(?:_mean|_sum)?|(?:tova|knorm|keydiff|caote)_\d+_\d+_\d+|recommended_\d+"
                         r"|a2sf_\d+_\d+_\d+_[0-9.]+|snapkv_\d+_\d+_\d+_\d+)\b")


def test_the_grammar_in_the_help_names_every_built_in_rule():
    for grammar, example in h2o.policy_names().items():
        assert grammar in cli.POLICY_GRAMMAR and example in cli.POLICY_GRAMMAR, grammar


def command_parser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser(name)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[name]


def help_of(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 0
    return capsys.readouterr().out


# --- the help --------------------------------------------------------------------------------------

def test_the_static_command_table_matches_each_module():
    for name in cli.COMMANDS:
        module = importlib.import_module(f"h2o.eval.commands.{name}")
        assert module.NAME == name and cli.HELPS[name] == module.HELP
        assert getattr(module, "USES_MODEL", True) == (name not in cli.NO_MODEL)


def test_a_command_that_runs_no_model_has_no_model_options():
    for name in cli.NO_MODEL:
        options = {o for a in command_parser(name)._actions for o in a.option_strings}
        assert {"--out", "--no-progress"} <= options and not options & {"--model", "--device", "--buffer", "--threads"}


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_option_has_help_and_its_true_default_once(command):
    parser = command_parser(command)
    formatter = parser._get_formatter()
    seen = set()
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        assert not seen & set(action.option_strings), action.option_strings
        seen |= set(action.option_strings)
        assert action.help and action.help.strip(), f"{command} {action.option_strings[0]} has no help"
        shown = formatter._expand_help(action)
        assert shown.lower().count("(default") <= 1, shown
        assert "(default: None)" not in shown and "(default: False)" not in shown and "(default: [" not in shown
        if action.default not in (None, False) and "default" not in action.help.lower():
            value = action.default
            value = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            assert shown.endswith(f"(default: {value})"), shown
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text


def test_score_help_states_the_real_default(capsys):
    score = next(a for a in command_parser("bench")._actions if "--score" in a.option_strings)
    assert score.default is None  # unset: H2O names without a rule take h2o.DEFAULT_SCORE
    assert f"(default: h2o.DEFAULT_SCORE = {h2o.DEFAULT_SCORE})" in score.help
    assert h2o.parse("h2o_4_32_256", None).score == h2o.DEFAULT_SCORE
    text = " ".join(help_of(["bench", "--help"], capsys).split())
    assert f"(default: h2o.DEFAULT_SCORE = {h2o.DEFAULT_SCORE})" in text
    assert "reindex: positions are cache slots" in text and "original: every kept key keeps its absolute" in text


def test_every_policy_name_in_the_grammar_and_examples_parses():
    text = cli.POLICY_GRAMMAR + "\n" + "\n".join(line for lines in cli.EXAMPLES.values() for line in lines)
    names = set(POLICY_NAME.findall(text))
    assert {"full", "streaming_4_252", "h2o_4_32_256", "h2o_4_32_256_mean", "h2o_4_64_512_sum"} <= names
    for name in names:
        h2o.parse(name)
    assert h2o.parse("h2o_4_32_256").name == "h2o_4_32_256_mean"  # "(= h2o_4_32_256_mean)" in the grammar
    assert f"_{h2o.DEFAULT_SCORE} (the default, h2o.DEFAULT_SCORE)" in cli.POLICY_GRAMMAR
    assert h2o.parse("streaming_4_252").budget == 256  # "(budget 256)"


@pytest.mark.parametrize("command", cli.COMMANDS)
def test_every_example_command_line_parses(command):
    parser = cli.build_parser(command)
    for line in cli.EXAMPLES[command]:
        words = shlex.split(line)
        assert words[:2] == ["h2o", command]
        args = parser.parse_args(words[1:])
        for name in getattr(args, "policies", []):
            if command != "tasks" or name not in h2o.policies.families():
                h2o.parse(name)


def test_the_grammar_is_the_epilog_of_h2o_and_of_every_command(capsys):
    assert cli.POLICY_GRAMMAR in help_of(["--help"], capsys)
    for command in cli.COMMANDS:
        text = help_of([command, "--help"], capsys)
        assert cli.POLICY_GRAMMAR in text
        assert all(line in text for line in cli.EXAMPLES[command])


# --- `h2o --help` imports nothing heavy ------------------------------------------------------------

# cli.py on its own: loaded under a bare `h2o` package, so that only what cli.py imports is counted.
_BARE = textwrap.dedent("""
    import io, contextlib, sys, types
    for name, path in (("h2o", {root!r} + "/h2o"), ("h2o.eval", {root!r} + "/h2o/eval")):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    from h2o.eval import cli
    for argv in (["--help"], [], ["benchh"]):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cli.main(argv)
            except SystemExit as exit:
                code = exit.code
        print(argv, code, repr(out.getvalue()[:60]), repr(err.getvalue()[-240:]))
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "matplotlib")
                   or m.startswith("h2o.eval.") and m != "h2o.eval.cli")
    print("heavy:", heavy)
""")


def test_h2o_help_no_command_and_an_unknown_one_import_no_command_module_nor_torch():
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-c", _BARE.format(root=str(ROOT))], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("['--help'] 0 'usage: h2o")
    assert lines[1].startswith("[] 2 ''") and "the following arguments are required" in lines[1]
    assert lines[2].startswith("['benchh'] 2 ''") and "invalid choice: 'benchh'" in lines[2]
    assert lines[3] == "heavy: []"
    assert time.perf_counter() - start < 30


def test_h2o_help_through_the_package_imports_no_torch():
    code = ("import sys; from h2o.eval import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "usage: h2o" in run.stdout


# --- clear errors before the model loads ---------------------------------------------------------

def test_a_binary_text_file_is_refused_naming_the_file(tmp_path, capsys):
    binary = tmp_path / "image.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    with pytest.raises(ValueError, match=r"image\.png is not UTF-8 text \(byte 0 cannot be decoded"):
        data.load_text_file(binary)
    nul = tmp_path / "nul.bin"
    nul.write_bytes(b"abc\x00\x00def")
    with pytest.raises(ValueError, match=r"nul\.bin is not text: it holds NUL bytes"):
        data.load_text_file(nul)
    out = tmp_path / "out"
    assert cli.main(["bench", "--model", "random:tiny-llama", "--add-text-file", str(binary), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{binary} is not UTF-8 text" in err and "codec" not in err and not out.exists()


@pytest.fixture
def online(monkeypatch):
    """No offline setting in the environment (each test sets the one it means)."""
    from huggingface_hub import constants
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(checkpoints, "_hub_cached", lambda name: False)
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c not in cli.NO_MODEL])
def test_a_hub_id_offline_is_refused_at_once(command, online, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(checkpoints, "_unreachable", lambda endpoint: pytest.fail("probed the network while offline"))
    out = tmp_path / "out"
    start = time.perf_counter()
    assert cli.main([command, "--model", "foo/bar", "--out", str(out)]) == 2
    assert time.perf_counter() - start < 10
    err = capsys.readouterr().err
    assert "could not load 'foo/bar' from the Hugging Face hub (offline mode: HF_HUB_OFFLINE=1 is set)" in err
    assert "Pass a local model directory" in err and "smollm2-135m" in err and "Traceback" not in err
    assert len(err.splitlines()) <= 3 and not out.exists()


def test_an_unreachable_hub_is_refused_at_once_and_a_cached_id_loads_offline(online, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(checkpoints, "_unreachable", lambda endpoint: f"couldn't connect to {endpoint}: no route")
    assert cli.main(["bench", "--model", "foo/bar", "--out", str(tmp_path / "out")]) == 2
    assert "(couldn't connect to https://huggingface.co: no route)" in capsys.readouterr().err
    # a cached copy is not refused, and is then loaded without asking the hub
    monkeypatch.setattr(checkpoints, "_hub_cached", lambda name: True)
    checkpoints.check_name("foo/bar")
    seen = {}

    class Auto:
        @staticmethod
        def from_pretrained(path, **kwargs):
            seen.update(kwargs)
            return "loaded"

    assert checkpoints._pretrained(Auto, "foo/bar", "foo/bar") == "loaded" and seen["local_files_only"] is True
    monkeypatch.setattr(checkpoints, "_unreachable", lambda endpoint: None)  # online: the hub client decides
    seen.clear()
    checkpoints._pretrained(Auto, "foo/bar", "foo/bar")
    assert "local_files_only" not in seen


def test_a_hub_id_is_not_probed_behind_a_proxy(online, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    monkeypatch.setattr(checkpoints, "_unreachable", lambda endpoint: pytest.fail("probed past the proxy"))
    assert checkpoints.hub_offline() is None
    checkpoints.check_name("foo/bar")


# --- duplicate policies are merged, with a note -------------------------------------------------

def test_stress_and_tasks_merge_names_of_the_same_policy(capsys):
    args = cli.build_parser("stress").parse_args(
        ["stress", "--model", "random:tiny-llama", "--policies", "full", "h2o_4_8_16", "h2o_4_8_16_mean",
         "streaming_4_12"])
    assert stress.check(args)["policies"] == ["full", "h2o_4_8_16_mean", "streaming_4_12"]
    assert ("note: --policies h2o_4_8_16, h2o_4_8_16_mean give the same policy h2o_4_8_16_mean: it runs once"
            in capsys.readouterr().out)
    v = answers.variants(["h2o", "h2o_mean", "h2o_4_8_64", "h2o_4_8_64_mean", "streaming"], None, [0.2], None)
    assert [(x.label, x.budget) for x in v] == [("h2o", "20%"), ("h2o_4_8_64_mean", "64"), ("streaming", "20%")]
    printed = capsys.readouterr().out
    assert "note: --policies h2o, h2o_mean give the same policies (h2o at 20%): it runs once" in printed
    assert "note: --policies h2o_4_8_64, h2o_4_8_64_mean give the same policy h2o_4_8_64_mean" in printed
    v = answers.variants(["h2o_sum", "h2o"], [128], None, "sum")
    assert [x.policy(1000) for x in v] == ["h2o_4_16_128_sum"]


def test_bench_merges_duplicates_and_its_rows_say_how_they_were_measured(tmp_path, capsys):
    out = tmp_path / "r"
    code = cli.main(["bench", "--model", "random:tiny-llama", "--policies", "h2o_2_4_16", "h2o_2_4_16_mean",
                     "full", "--buffer", "4", "--positions", "reindex", "--context", "40", "--new-tokens", "3",
                     "--repeats", "1", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "note: --policies h2o_2_4_16, h2o_2_4_16_mean give the same policy h2o_2_4_16_mean" in printed
    rows = list(csv.DictReader(open(out / "bench.csv")))
    assert [r["configuration"] for r in rows] == ["full", "h2o_2_4_16_mean"]
    for r in rows:  # random weights: no PPL, and the rows say so
        assert (r["ppl_mode"], r["ppl_tokens"], r["positions"], r["buffer"]) == ("not measured", "", "reindex", "4")
    payload = json.loads((out / "bench.json").read_text())
    assert payload["rows"][0]["positions"] == "reindex" and payload["rows"][0]["buffer"] == 4


# --- the bench plot -------------------------------------------------------------------------------

def test_bench_plot_zooms_ppl_colours_families_marks_tpot_min_and_titles_the_setup():
    from matplotlib.colors import to_hex

    rows = [{"configuration": name, "wikitext_ppl": ppl, "tpot_median_ms": tpot, "tpot_min_ms": tpot - 3,
             "kv_mib": kv} for name, ppl, tpot, kv in
            [("full", 15.0, 50.0, 92.0), ("streaming_4_252", 26.3, 37.0, 14.2), ("h2o_4_32_256_mean", 23.5, 40.0, 14.4),
             ("my_policy", 20.0, 45.0, 30.0)]]
    setup = "PPL chunked, 32 tokens per forward, 2048 tokens per text; positions original, lazy buffer 64"
    fig = bench.plot(rows, {"wikitext": None}, "smollm2-135m", 2048, setup)
    try:
        ppl_ax, tpot_ax, kv_ax = fig.axes
        low, high = ppl_ax.get_ylim()
        assert 13 < low < 15 and 26.3 < high < 29  # the data range with margins, not from 0
        assert tpot_ax.get_ylim()[0] == 0 and kv_ax.get_ylim()[0] == 0
        colours = [to_hex(bar.get_facecolor()) for bar in ppl_ax.patches]
        expected = [bench.FAMILY_COLORS[f] for f in ("full", "streaming", "h2o", "other")]
        assert colours == expected and len(set(colours)) == 4
        mins = tpot_ax.collections[0].get_offsets()[:, 1].tolist()
        assert mins == [47.0, 34.0, 37.0, 42.0]
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels == ["full cache", "StreamingLLM", "H2O", "other (ours)", "TPOT min"]
        assert setup in fig._suptitle.get_text() and "smollm2-135m" in fig._suptitle.get_text()
    finally:
        from h2o.eval import report
        report.pyplot().close(fig)
