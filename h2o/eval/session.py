"""The skeleton every `h2o` command runs on: the run record, progress, outputs.

A command is a module with

    NAME, HELP                      its name and one line of help
    check(args) -> plan             every refusal of bad input, before any model loads or any output is made
    run(session, plan) -> int       its measurement, through the `Session` it is given

and nothing else: its options, the shared ones and its own, are defined in `h2o.eval.options` (built without
importing torch or the command's module, so that `h2o <command> --help` answers at once); loading the model,
reading the text, the progress bars, the run record (model, versions, arguments, machine) and writing the table,
CSV, JSON and plots (each atomically) live here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoints, data, report


def load_text(args) -> tuple[str, str] | None:
    """(text, source) from --text-file or --corpus/--pg19-book, for a command's `check` (a missing file is an
    error before any model loads); None for random-weight models, which are fed random ids."""
    if args.model.startswith("random:"):
        return None
    return data.load_text(args.corpus, args.pg19_book if args.corpus == "pg19" else None, args.text_file,
                          args.data_dir)


def unique_policies(names: list[str], canonical: list[str]) -> list[str]:
    """The canonical names once each, in order; names that spell the same policy are merged, with a note."""
    spellings: dict[str, list[str]] = {}
    for name, policy in zip(names, canonical, strict=True):
        spellings.setdefault(policy, []).append(name)
    for policy, given in spellings.items():
        if len(given) > 1:
            print(f"note: --policies {', '.join(given)} give the same policy {policy}: it runs once")
    return list(spellings)


def quiet_libraries() -> None:
    """--no-progress: transformers' and datasets' own progress bars off too (loading weights, reading data)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        import datasets
    except ImportError:
        return
    datasets.disable_progress_bars()


class Session:
    """One run of one command: its arguments, output directory, model, progress bars and outputs."""

    def __init__(self, command: str, args: argparse.Namespace):
        self.command, self.args = command, args
        self.out = report.prepare_output_dir(args.out)
        self.stage = self.out / f".h2o-{command}-{os.getpid()}"
        self.started = time.time()
        self.model = self.tokenizer = None
        self.info: dict = {}
        self.files: list[Path] = []
        self.executor = self.ledger = None  # where units run, and their ledger (run_units)
        self.resumed = self.ran = 0
        if getattr(args, "no_progress", False):  # every bar, the libraries' too (transformers' weight loading)
            quiet_libraries()

    # --- inputs ---------------------------------------------------------------------------------

    def load_model(self, attn: str | None = None, local: bool | None = None):
        """(model, tokenizer or None) from the shared options; `attn` overrides --attn. With --ray the model is
        loaded by the workers, not here (model None; the tokenizer only, and the model's description from a
        worker), unless `local` (a command that also measures speed in this process)."""
        a = self.args
        if local is None:
            local = getattr(a, "ray", None) is None
        if not local:
            self.tokenizer = checkpoints.load_tokenizer(a.model)
            self.info = next(iter(self._units_executor().infos.values()))["model"]
            return None, self.tokenizer
        self.model, self.tokenizer = checkpoints.load_model(a.model, a.device, a.dtype, attn or a.attn, a.device_map)
        self.info = checkpoints.describe(self.model)
        from . import runners

        model, tokenizer = self.model, self.tokenizer

        def head_scores(**options):  # for allocations that rank heads: computed on first need, cached beside the model
            from . import head_score_cache
            return head_score_cache.scores_for(model, tokenizer, a.model, a.data_dir, **options)

        def surrogate():  # for a kvzap rule: fitted on first need, cached beside the model
            from . import surrogate_cache
            return surrogate_cache.surrogate_for(model, tokenizer, a.model, a.data_dir)

        runners.provide_head_scores(model, head_scores)
        runners.provide_surrogate(model, surrogate)
        runners.provide_tokenizer(model, tokenizer)
        return self.model, self.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def token_ids(self, text: tuple[str, str] | None, n: int) -> tuple[torch.Tensor, str]:
        """[1, n] ids of the text, or random ids for a random-weight model (no tokenizer)."""
        vocab = (self.model.config if self.model is not None else checkpoints.load_config(self.args.model)).vocab_size
        return data.token_ids(self.tokenizer, vocab, text, n, self.args.bos)

    def progress(self, **kwargs) -> tqdm:
        return tqdm(disable=self.args.no_progress, leave=False, **kwargs)

    @property
    def model_line(self) -> str:
        """The first note of every command: what model, where, how the cache is set up."""
        i = self.info
        return (f"model {i['name']} ({i['family']}, {i['dtype']}, {i['device']}, attention {i['attn_implementation']}); "
                f"positions {self.args.positions}, lazy buffer {self.args.buffer}")

    # --- units of work (h2o.eval.units): in this process or on Ray, each kept on disk as it finishes ------

    def _units_executor(self):
        if self.executor is None:
            from . import units

            a = self.args
            if getattr(a, "ray", None) is None:
                self.executor = units.Local(self.model, self.tokenizer)
            else:
                self.executor = units.RayPool(a.ray, a.workers or 2, units.setup_of(a))
        return self.executor

    def run_units(self, work: list, desc: str) -> dict[str, dict]:
        """{unit key: result} of every unit (each once), those a resumed ledger holds not run again; each
        result is appended to <out>/<command>_units.jsonl as it finishes."""
        from . import units

        if self.ledger is None:
            header = {"command": self.command, "configuration": units.configuration(self.args),
                      "versions": units.versions()}
            self.ledger = units.Ledger(units.ledger_path(self.out, self.command), json.loads(json.dumps(header)),
                                       resume=getattr(self.args, "resume", None) is not None)
            self.resumed = len(self.ledger.done)
        unique = list({u.key: u for u in work}.values())
        todo = [u for u in unique if u.key not in self.ledger.done]
        executor = self._units_executor()
        bar = self.progress(total=len(unique), initial=len(unique) - len(todo), desc=desc, unit="unit")
        counts: dict[str, int] = {}
        try:
            for unit, result, worker, seconds in executor.run(todo):
                self.ledger.append(unit.key, result, worker, seconds)
                counts[worker] = counts.get(worker, 0) + 1
                bar.set_postfix(counts, refresh=False)
                bar.update()
                self.ran += 1
        except KeyboardInterrupt:
            bar.close()
            print(f"\ninterrupted: {len(self.ledger.done)} finished units are in {self.ledger.path}; finish the run "
                  f"with the same command and --resume {self.out}", file=sys.stderr)
            raise
        bar.close()
        return {u.key: self.ledger.done[u.key] for u in work}

    def units_note(self) -> str | None:
        if self.executor is None:
            return None
        from . import units

        note = units.describe_executor(self.executor.record())
        return note + (f"; {self.resumed} unit(s) from the resumed {self.ledger.path.name}" if self.resumed else "")

    # --- outputs --------------------------------------------------------------------------------

    def record(self, **fields) -> dict:
        """The run record every JSON output carries: command, arguments, model, versions and machine."""
        record = {"command": self.command, "args": dict(vars(self.args)), "model": self.info, "environment": report.environment(),
                  **fields, "wall_time_s": time.time() - self.started}
        if self.executor is not None:
            record["units"] = {**self.executor.record(), "ledger": str(self.ledger.path) if self.ledger else None,
                               "resumed": self.resumed, "ran": self.ran}
        return record

    # Outputs are staged in a hidden folder of the output directory and moved into place together by
    # `finish`, so a run killed or failed midway never leaves one run's CSV beside another run's JSON or PNG.

    def write_csv(self, name: str, rows: list[dict]) -> Path:
        return self._keep(name, report.write_csv(self._staged(name), rows))

    def write_json(self, name: str, **fields) -> Path:
        return self._keep(name, report.write_json(self._staged(name), self.record(**fields)))

    def plot(self, name: str, figure) -> Path:
        """Save a matplotlib figure (closed after) as `name` in the output directory."""
        return self._keep(name, report.save_figure(figure, self._staged(name)))

    def finish(self, tables: list[str], notes: list[str]) -> int:
        """Move every staged output into the output directory, then print the tables and notes."""
        where = self.units_note()
        for path in self.files:
            os.replace(self.stage / path.name, path)
        self.discard()
        for table in tables:
            print(table)
        print("\n".join(f"- {note}" for note in notes + ([where] if where else [])))
        written = self.files + ([self.ledger.path] if self.ledger is not None else [])
        print(f"wrote {', '.join(map(str, written))} ({time.time() - self.started:.0f} s)")
        return 0

    def discard(self) -> None:
        """Drop what a run staged and did not finish; close the units' ledger (kept) and any Ray workers."""
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.ledger is not None:
            self.ledger.close()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None

    def _staged(self, name: str) -> Path:
        self.stage.mkdir(exist_ok=True)
        return self.stage / name

    def _keep(self, name: str, staged: Path) -> Path:
        self.files.append(self.out / name)
        return self.out / name
