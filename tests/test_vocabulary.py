"""One vocabulary across the commands (issue 42): one option name per concept, with one meaning wherever it appears.

`CONCEPTS` is the table, concept -> option name; every option of every command is in it, under its name, or is a
deprecated alias registered in `h2o.eval.options.DEPRECATED` (kept one release: it parses to its new option's
destination and prints one line on stderr naming the new option). Options that share a name have the same
destination, type, number of values, choices and default in every command, or the difference is listed in
`DIFFERENT` with its reason. A new option: add its concept here (a name already in the table where it is the same
concept); a renamed one: its old name to `DEPRECATED`.

The parsers are built as `h2o <command> --help` builds them, without torch (`test_the_parsers_import_nothing_heavy`).
"""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from h2o.eval import cli, options

ROOT = Path(__file__).resolve().parents[1]

# concept -> option name
CONCEPTS = {
    # the model, the data, the cache (every command that runs a model, but for what it would ignore: NOT_TAKEN)
    "model: built-in name, hub id or directory": "--model",
    "device to run on": "--device",
    "dtype of weights and activations": "--dtype",
    "attention implementation": "--attn",
    "accelerate's device map": "--device-map",
    "directory of the local corpora": "--data-dir",
    "the tokenizer's BOS token prepended or not": "--bos",
    "CPU threads for torch": "--threads",
    "positions of the kept keys (original or cache slots)": "--positions",
    "lazy eviction slack, tokens over the budget": "--buffer",
    "H2O scoring rule of names without one": "--score",
    "output directory": "--out",
    "progress bars hidden": "--no-progress",
    # units of work: Ray and resumed runs
    "Ray cluster to run the units on": "--ray",
    "Ray workers": "--workers",
    "the run to finish": "--resume",
    # what runs
    "policy names (or, in tasks, families sized per prompt) compared": "--policies",
    "budget-free rule families, each run at every budget": "--rules",
    "the one compressed policy whose bookkeeping is timed": "--policy",
    "the StreamingLLM policy timed beside it": "--streaming",
    "the allocation timed against its rule uniform": "--allocation",
    "cache budgets (tokens)": "--budgets",
    "cache budgets as shares of the prompt": "--budget-ratio",
    "budget of the throughput part": "--throughput-budget",
    "recent window as a share of the budget": "--recent-share",
    "what sweep measures": "--parts",
    # the texts
    "corpus (corpora, where a command reads several) of the text": "--corpus",
    "PG-19 book(s) of --corpus pg19": "--pg19-book",
    "a UTF-8 text file read instead of --corpus": "--text-file",
    "a UTF-8 text file measured beside --corpus": "--add-text-file",
    "texts by spec (wikitext, pg19:<id>, code:<module>, licence:python, a file), one unit each": "--texts",
    "the held-out PG-19 book of the calibration needles": "--calibration-book",
    # perplexity
    "tokens scored per text": "--ppl-tokens",
    "tokens per forward of the chunked PPL evaluation": "--ppl-chunk",
    "PPL protocol: token by token or chunked": "--ppl-mode",
    "speed and memory only": "--no-ppl",
    # feeding a context, timing decoding
    "tokens of a context fed per forward, eviction in force": "--context-chunk",
    "prompt tokens before the timed decoding": "--context",
    "timed single-token decode steps": "--decode-steps",
    "tokens generated per speed run": "--new-tokens",
    "interleaved repeats of the speed run": "--repeats",
    "rows of the speed run": "--batch",
    "batch sizes of the throughput part": "--batches",
    "lengths (tokens) of the prompts or checkpoints measured": "--lengths",
    "tokens of the timed prefill": "--prefill",
    "interleaved timed prefills per configuration": "--rounds",
    "lengths of the KV-bytes readings": "--kv-lengths",
    "tokens per forward of the KV-bytes run": "--kv-chunk",
    "tokens per forward of the timed prefill": "--prefill-chunk",
    "untimed decode steps before the timed ones": "--warmup",
    "the prefill profiled part by part": "--prefill-parts",
    "torch.compile timed too": "--compile",
    "torch.compile mode": "--compile-mode",
    "torch.compile backend": "--compile-backend",
    # retrieval
    "retrieval task names": "--tasks",
    "needle cases": "--cases",
    "needle depths": "--depths",
    "wordings of the retrieval cases": "--phrasings",
    "retrieval protocol: question-aware, streaming, multi-question or multi-turn": "--protocol",
    "retrieval protocols of bench's kept columns (question-aware, streaming), a column each": "--protocols",
    "questions asked of one context (the multi-question protocols)": "--questions",
    "fewest cases the full cache must solve for a score": "--min-solved",
    "seed of the generated inputs": "--seed",
    # heatmap
    "layers shown": "--layers",
    "tokens of the heatmap's text": "--tokens",
    "leading tokens counted as attention sinks": "--sinks",
    "heavy hitters marked": "--top-k",
    # heads
    "random tokens per sequence": "--random-tokens",
    "random sequences averaged over": "--random-sequences",
    "needle cases of the ablation score": "--ablation-cases",
    "haystack tokens per calibration needle case": "--context-tokens",
    "calibration tokens replayed for the reconstruction head score": "--reconstruction-tokens",
    "calibration tokens the surrogate of KVzip's scores is fitted on": "--calibration-tokens",
    "heads listed per score": "--top",
    "cached scores recomputed": "--recompute",
    # choose (reads results)
    "sweep results to choose from": "--sweep",
    "tasks results of held-out cases": "--held-out-tasks",
    "the sweep's texts the criterion uses": "--tuning-texts",
    "the rule no candidate may fall below": "--reference",
    "rule families or policies to choose among": "--candidates",
}

# name -> {what may differ across the commands that share it: why}. "commands" lists commands whose option of that
# name is another concept altogether (left out of the comparison)
DIFFERENT = {
    "--policies": {"default": "each command's own comparison: bench the results table's rows, tasks families sized "
                              "per prompt, stress a few policies streamed to 16k tokens"},
    "--budgets": {"default": "tasks sizes its families by --budget-ratio unless given budgets; sweep runs four"},
    "--corpus": {"nargs": "bench (a PPL column each) and tasks (haystacks) read several corpora, the others one text",
                 "default": "each command's own text: PG-19 for long contexts, WikiText-2 for short ones"},
    "--pg19-book": {"nargs": "tasks cuts a haystack from each of several books; the others read one book",
                    "default": "tasks' haystacks come from three books"},
    "--lengths": {"default": "tasks: short prompts many times over; bench and sweep: one length for their kept "
                             "columns; stress: checkpoints up to 16k tokens, more on CUDA (None: per device)"},
    "--cases": {"default": "tasks: per cell of its --depths grid; bench: its kept columns; sweep: the passkey column "
                           "is opt-in (0 = none); heads: calibration cases of the retrieval score"},
    "--tasks": {"default": "bench runs one kept column by default, tasks three tasks",
                "commands": {"choose": "choose reads results: its --sweep and --tasks name the commands whose JSON "
                                       "it reads (tasks.json files)"}},
    "--context-chunk": {"default": "stress streams up to 16k+ tokens through every policy in lockstep (256 keeps its "
                                   "run short); tasks' prompts are about 1k tokens (128)"},
    "--context": {"default": "each timing's own prompt: bench 2048; sweep per device (None: 512 on CPU, 1024 on "
                             "CUDA, rows at every batch size); perf 4096 (eviction in force at its budget)"},
    "--decode-steps": {"default": "stress times a few steps at each of its checkpoints; perf many at one length"},
    "--new-tokens": {"default": "sweep's is per device (None: 8 on CPU, 32 on CUDA, at every batch size)"},
    "--repeats": {"default": "sweep repeats every batch size once; bench its one speed run three times"},
}

# old names (deprecated aliases in one command) that another command keeps as a name of its own
REUSED = {
    "--text-file": "bench's old --text-file added a column; every other command's reads a file instead of --corpus",
    "--repeats": "heads' old --repeats counted random sequences; bench's and sweep's repeat the speed run",
}

HELP = ("-h", "--help")


def command_parser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser(command)
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]


@pytest.fixture(scope="module")
def parsers():
    return {command: command_parser(command) for command in cli.COMMANDS}


def dest_of(name: str) -> str:
    return name.removeprefix("--").replace("-", "_")


def own_actions(parser) -> list[argparse.Action]:
    """The command's options, its deprecated aliases and --help left out."""
    return [a for a in parser._actions if a.option_strings and not isinstance(a, options.DeprecatedAlias)
            and a.option_strings[0] not in HELP]


# --- (1) one table, one name per concept -----------------------------------------------------------------------

def test_the_table_gives_each_concept_one_name_and_each_name_one_concept():
    names = list(CONCEPTS.values())
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
    assert all(n.startswith("--") and n == n.lower() for n in names)


def test_every_option_of_every_command_is_in_the_table_under_its_name(parsers):
    used = set()
    for command, parser in parsers.items():
        for action in own_actions(parser):
            name, *others = action.option_strings
            if isinstance(action, argparse.BooleanOptionalAction):  # --bos / --no-bos: one option
                others = [o for o in others if o != "--no-" + name.removeprefix("--")]
            assert not others, f"h2o {command} {name}: also {others}: a second name is a deprecated alias, or none"
            assert name in CONCEPTS.values(), f"h2o {command} {name}: not in the vocabulary (tests/test_vocabulary.py)"
            assert action.dest == dest_of(name), f"h2o {command} {name} stores into {action.dest!r}"
            used.add(name)
    assert used == set(CONCEPTS.values()), f"in the table, offered by no command: {set(CONCEPTS.values()) - used}"


def test_every_other_name_is_a_registered_deprecated_alias(parsers):
    for command, parser in parsers.items():
        found = {}
        for action in parser._actions:
            if isinstance(action, options.DeprecatedAlias):
                (old,) = action.option_strings
                found[old] = action.new
        assert found == options.DEPRECATED.get(command, {}), command


def test_an_old_name_is_no_concept_of_its_own():
    """A retired name comes back only as a deprecated alias, unless another command keeps it for its own concept."""
    for command, aliases in options.DEPRECATED.items():
        for old, new in aliases.items():
            assert new in CONCEPTS.values(), (command, old, new)
            assert old not in CONCEPTS.values() or old in REUSED, f"h2o {command} {old} (now {new}) is in the table"
    retired = {old for aliases in options.DEPRECATED.values() for old in aliases}
    assert set(REUSED) <= retired


# --- (2) the deprecated aliases ---------------------------------------------------------------------------------

ALIASES = [(command, old, new) for command, aliases in options.DEPRECATED.items() for old, new in aliases.items()]


def a_value(action: argparse.Action) -> list[str]:
    return [str(action.choices[0])] if action.choices else ["77"]


@pytest.mark.parametrize("command, old, new", ALIASES, ids=[f"{c} {o}" for c, o, _ in ALIASES])
def test_a_deprecated_alias_parses_as_its_new_name_and_says_so(command, old, new, monkeypatch, capsys):
    monkeypatch.setattr(options, "rule_family", str)  # sweep's --rules type asks the policies (torch): not here
    parser = cli.build_parser(command)
    target = next(a for a in command_parser(command)._actions if new in a.option_strings)
    alias = next(a for a in command_parser(command)._actions if old in a.option_strings)
    assert isinstance(alias, options.DeprecatedAlias) and alias.help == argparse.SUPPRESS
    same = ("dest", "nargs", "type", "choices", "metavar")
    assert [getattr(alias, k) for k in same] == [getattr(target, k) for k in same]
    assert f"formerly {old}" in target.help  # the help names the old name beside the new one
    value = a_value(target)

    with_new = parser.parse_args([command, new, *value])
    assert capsys.readouterr().err == ""
    with_old = parser.parse_args([command, old, *value])
    err = capsys.readouterr().err
    assert with_old == with_new and getattr(with_old, target.dest) != target.default
    assert err.count("\n") == 1 and err.startswith(f"h2o {command}: warning: {old} is deprecated")
    assert f"use {new}" in err
    with options.quiet_aliases():
        parser.parse_args([command, old, *value])
    assert capsys.readouterr().err == ""


def test_a_run_says_it_once_before_torch_is_imported():
    """`h2o` parses the arguments twice (before torch, for --help and argparse's refusals, then with torch): the
    deprecation line comes from the first, once. Here a refusal before torch (--buffer) ends the run there."""
    run = subprocess.run([sys.executable, "-c", "import sys; from h2o.eval.cli import main; code = main(sys.argv[1:]);"
                          " assert 'torch' not in sys.modules; sys.exit(code)",
                          "tasks", "--chunk", "8", "--buffer", "-5"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.splitlines()
    assert lines == ["h2o tasks: warning: --chunk is deprecated and will be removed in the next release: use "
                     "--context-chunk", "h2o tasks: error: --buffer must be >= 0, got -5"]


def test_a_run_that_goes_on_says_it_once(monkeypatch, capsys):
    import types

    real = cli.importlib.import_module
    stopped = types.SimpleNamespace(check=lambda args: (_ for _ in ()).throw(ValueError(f"stop {args.decode_steps}")))
    monkeypatch.setattr(cli.importlib, "import_module",  # the command's module: stopped at its check
                        lambda name, *a, **k: stopped if name == "h2o.eval.commands.perf" else real(name, *a, **k))
    assert cli.main(["perf", "--model", "random:tiny-llama", "--steps", "9", "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert err.count("deprecated") == 1 and "use --decode-steps" in err and "stop 9" in err


# --- (3) one name, one meaning ---------------------------------------------------------------------------------

def signature(action: argparse.Action) -> dict:
    return {"dest": action.dest, "type": action.type, "nargs": action.nargs, "choices": action.choices,
            "action": type(action).__name__, "required": action.required, "const": action.const,
            "default": action.default}


def test_options_that_share_a_name_share_its_meaning_and_default(parsers):
    shared: dict[str, dict[str, dict]] = {}
    for command, parser in parsers.items():
        for action in own_actions(parser):
            shared.setdefault(action.option_strings[0], {})[command] = signature(action)
    for name, listed in DIFFERENT.items():
        assert name in shared and len(shared[name]) > 1, f"{name}: listed in DIFFERENT but not shared"
        assert set(listed.get("commands", {})) <= set(shared[name]), name
    for name, per_command in shared.items():
        allowed = DIFFERENT.get(name, {})
        compared = {c: s for c, s in per_command.items() if c not in allowed.get("commands", {})}
        for key in next(iter(compared.values())):
            values = {c: s[key] for c, s in compared.items()}
            distinct = list({repr(v): v for v in values.values()}.values())
            if len(distinct) > 1:
                assert key in allowed, f"{name}: its {key} differs across commands ({values}) and is not in DIFFERENT"
            elif key in allowed:
                pytest.fail(f"{name}: DIFFERENT lists its {key}, but it is the same everywhere now: drop it")


def test_the_text_file_means_instead_of_the_corpus_everywhere(parsers):
    for command, parser in parsers.items():
        for action in own_actions(parser):
            if action.option_strings[0] == "--text-file":
                assert action.help.startswith(options.TEXT_FILE_HELP), command


# --- options a command would ignore are not offered -------------------------------------------------------------

@pytest.mark.parametrize("command", sorted(options.NOT_TAKEN))
def test_heads_and_heatmap_offer_no_option_they_would_ignore(command, parsers):
    offered = {o for a in parsers[command]._actions for o in a.option_strings}
    assert not offered & set(options.NOT_TAKEN[command])
    source = (ROOT / "h2o" / "eval" / "commands" / f"{command}.py").read_text()
    for name in options.NOT_TAKEN[command]:
        assert f"args.{dest_of(name)}" not in source, f"h2o {command} reads {name}, which it no longer offers"
    with pytest.raises(SystemExit):
        cli.build_parser(command).parse_args([command, "--positions", "reindex"])


def test_the_parsers_import_nothing_heavy():
    code = ("import sys; from h2o.eval import cli; cli.build_parser(); "
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
