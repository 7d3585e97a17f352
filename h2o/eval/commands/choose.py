"""`h2o choose`: the joint criterion (`h2o.eval.selection`) over measured perplexity and retrieval runs.

It runs no model: it reads `h2o sweep --parts ppl --texts ...` runs (sweep.json) and `h2o tasks` runs (tasks.json,
one per protocol; tuning cases, and apart held-out ones), checks that they measured the same candidates beside the
reference, and prints every candidate's cells below the reference, its worst-case gap closed and its pooled kept
shares with their intervals, ranked by the criterion:

    h2o choose --sweep results/sweep/sweep.json --tasks results/qa/tasks.json results/st/tasks.json \\
        --held-out-tasks results/qa-held/tasks.json --tuning-texts wikitext pg19:10146 pg19:10321 code:argparse

Several models at once: one sweep per model and each model's tasks runs (every input says which model it
measured); the cells of every model enter one criterion, so the rule chosen is below the reference on no model's
tuning cell, and its worst-case gap is the worst over every model's tuning texts.
"""

from __future__ import annotations

import json
from pathlib import Path

from .. import report, selection

NAME = "choose"
HELP = "the joint criterion over sweep and tasks results: the rule never below StreamingLLM, best worst-case gap"
USES_MODEL = False  # reads results only: the model and cache options do not apply
COLUMNS = {"rank": "Rank", "candidate": "Candidate", "verdict": "Verdict", "tuning_cells": "Tuning cells",
           "below": "Below ref.", "surely_below": "Surely below", "worst_gap": "Worst gap (tuning)",
           "mean_gap": "Mean gap (tuning)", "mean_pooled_kept": "Mean pooled kept (tuning)",
           "held_out_cells": "Held-out cells", "held_out_below": "Held-out below",
           "held_out_worst_gap": "Held-out worst gap"}
CELL_COLUMNS = {"candidate": "Candidate", "split": "Split", "where": "Where", "shown": "Candidate vs reference",
                "interval": "[95%]", "surely_below": "Surely below"}


def _load(path: str, command: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / f"{command}.json"
    if not p.is_file():
        raise FileNotFoundError(f"{path}: no {command}.json there (the output of `h2o {command}`)")
    try:
        record = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{p}: not JSON ({err})") from None
    if record.get("command") != command:
        raise ValueError(f"{p}: written by `h2o {record.get('command')}`, not `h2o {command}`")
    return {**record, "path": str(p)}


def _model(record: dict) -> str:
    return (record.get("model") or {}).get("name") or "?"


def check(args) -> dict:
    sweeps = [_load(path, "sweep") for path in args.sweep]
    for sweep in sweeps:
        if not sweep.get("ppl_rows"):
            raise ValueError(f"{sweep['path']}: no perplexity rows (run `h2o sweep --parts ppl --texts ...`)")
    tuning = [_load(path, "tasks") for path in args.tasks]
    held = [_load(path, "tasks") for path in args.held_out_tasks]
    models = [_model(s) for s in sweeps]
    if len(set(models)) < len(models):
        twice = next(m for m in models if models.count(m) > 1)
        raise ValueError(f"two sweeps measured {twice}: give one sweep per model")
    for t in tuning + held:
        if _model(t) not in models:
            raise ValueError(f"{t['path']} measured {_model(t)}, and no --sweep did (the sweeps measured "
                             f"{', '.join(models)}): the inputs measured different models")
    for m in models:
        if not any(_model(t) == m for t in tuning):
            raise ValueError(f"no --tasks run measured {m}: every model needs its tuning tasks runs")
    for sweep in sweeps:
        texts = list(dict.fromkeys(r["text"] for r in sweep["ppl_rows"]))
        unknown = [t for t in args.tuning_texts if t not in texts]
        if unknown:
            raise ValueError(f"--tuning-texts {unknown[0]}: not a text of {sweep['path']} ({', '.join(texts)})")
    measured = {**{s["path"]: {r["family"] for r in s["ppl_rows"]} for s in sweeps},
                **{t["path"]: {r["policy"] for r in t["summary"]} for t in tuning + held}}
    for path, names in measured.items():
        if args.reference not in names:
            raise ValueError(f"{path}: the reference {args.reference!r} was not measured there")
    common = [c for c in dict.fromkeys(r["family"] for s in sweeps for r in s["ppl_rows"])
              if c not in (args.reference, "full") and all(c in names for names in measured.values())]
    candidates = args.candidates or common
    for c in candidates:
        missing = [path for path, names in measured.items() if c not in names]
        if missing:
            raise ValueError(f"candidate {c!r} was not measured in {missing[0]}: every candidate needs every input")
    if not candidates:
        raise ValueError("no candidate was measured in every input beside the reference")
    return {"sweeps": sweeps, "tuning": tuning, "held": held, "candidates": candidates, "models": models}


def _labelled(cells: list[dict], model: str, several: bool) -> list[dict]:
    """The cells of one model's input, each saying which model it measured (in `where` too, when several)."""
    return [{**c, "model": model, "where": f"{model}: {c['where']}" if several else c["where"]} for c in cells]


def run(session, plan) -> int:
    args = session.args
    candidates, reference = plan["candidates"], args.reference
    several = len(plan["models"]) > 1
    cells = []
    for sweep in plan["sweeps"]:
        cells += _labelled(selection.ppl_cells(sweep["ppl_rows"], candidates, reference, set(args.tuning_texts)),
                           _model(sweep), several)
    for split, runs in ((selection.TUNING, plan["tuning"]), (selection.HELD_OUT, plan["held"])):
        for t in runs:
            cells += _labelled(selection.task_cells(t["summary"], t["paired"], t["protocol"], split, candidates,
                                                    reference), _model(t), several)
    rows, chosen, notes = selection.choose(cells, candidates)
    protocols = {m: sorted({t["protocol"] for t in plan["tuning"] if _model(t) == m}) for m in plan["models"]}
    notes = [f"model{'s' if several else ''} {', '.join(plan['models'])}; reference {reference}; tuning texts "
             f"{', '.join(args.tuning_texts)}; tuning tasks in protocol(s) "
             + "; ".join((f"{m}: " if several else "") + ", ".join(p) for m, p in protocols.items())
             + "; inputs: " + ", ".join(r["path"] for r in plan["sweeps"] + plan["tuning"] + plan["held"]),
             "a cell: one text at one budget (perplexity), or one task in one protocol, phrasing (each and 'all', "
             "pooled) and budget (kept share of the full cache's solved cases); below: worse than the reference there "
             "(point estimates); surely below: a gap interval wholly under 0, or McNemar p < 0.05 for the reference",
             *notes]
    if several:
        notes.append("one criterion over every model's cells: the worst-case gap is the worst over every model's "
                     "tuning texts")
    for m, p in protocols.items():
        if len(p) < 2:
            notes.append(f"the tuning tasks of {m} ran in one protocol only ({p[0]}): the criterion covers that one")
    notes.append(f"chosen: {chosen}" if chosen else "chosen: none")
    session.write_csv("choose.csv", rows)
    session.write_csv("choose_cells.csv", cells)
    session.write_json("choose.json", chosen=chosen, candidates=rows, cells=cells, notes=notes)
    session.plot("choose.png", plot_cells(cells, candidates, reference))
    below = [c for c in cells if c["below"]]
    tables = [report.format_table(rows, COLUMNS)]
    if below:
        tables.append("cells below the reference (tuning and held-out):\n" + report.format_table(below, CELL_COLUMNS))
    return session.finish(tables, notes)


def plot_cells(cells: list[dict], candidates: list[str], reference: str):
    """Per candidate, every cell's margin over the reference: the gap closed (perplexity; 0 is the reference) and
    the kept share minus the reference's (retrieval); tuning filled, held-out hollow; below 0 is below it."""
    plt = report.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.5 * len(candidates) + 2.5), layout="constrained", squeeze=False)
    for ax, kind, label in zip(axes[0], ("ppl", "tasks"), ("gap closed (perplexity)", "kept share - reference's")):
        for i, c in enumerate(candidates):
            for split, face in ((selection.TUNING, f"C{i}"), (selection.HELD_OUT, "none")):
                xs = [x["value"] - (0 if kind == "ppl" else x["reference_value"]) for x in cells
                      if x["candidate"] == c and x["kind"] == kind and x["split"] == split and x["value"] is not None]
                ax.scatter(xs, [i] * len(xs), facecolors=face, edgecolors=f"C{i}", alpha=0.7,
                           label=split if i == 0 else None)
        ax.axvline(0, color="k", lw=1)
        ax.set_yticks(range(len(candidates)), candidates, fontsize=7)
        ax.set_xlabel(f"{label}; left of 0: below {reference}")
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Every cell of the joint criterion against {reference} (filled: tuning, hollow: held-out)", fontsize=9)
    return fig
