"""`h2o stress`: the long-context stress test.

One document streams through every policy's cache in lockstep (for each `--context-chunk` tokens, each
policy in turn), so machine noise falls on all alike. At each checkpoint length every policy
takes `--decode-steps` single-token steps on the next real tokens, interleaved step by step and
timed (TPOT min and median). Recorded per policy and length: TPOT, the exact cache bytes
(`kv_bytes()`), the process memory, and the PPL of the segment since the previous checkpoint
(the NLL of every token the chunk and decode forwards predicted, as `h2o.eval.ppl` computes it).

Memory never crashes the run: on CPU a policy whose predicted cache (its measured bytes per kept
token x the tokens it will keep) would push all caches past `MEMORY_SHARE` of the memory they
may use is stopped before that length ("skipped: would exceed memory"); an out-of-memory error
(CUDA, or CPU allocator) stops it there ("OOM"). The other policies go on.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field

import psutil
import torch

import h2o
from h2o.policies import parse, resolve

from .. import memory, report, runners
from ..memory import MEMORY_SHARE, OK, OOM, SKIPPED, is_oom
from ..options import CPU_LENGTHS, CUDA_LENGTHS
from ..session import load_text, unique_policies
from ..ppl import PPLResult, ValidityError, check_bound, check_eviction_in_force, next_token_losses, trained_context
from ..speed import sync

NAME = "stress"
HELP = "long-context stress test: TPOT, memory and segment PPL per policy from 1k to 16k tokens"
COLUMNS = {"policy": "Policy", "length": "Context", "status": "Status", "tpot_median_ms": "TPOT med (ms)",
           "tpot_min_ms": "TPOT min (ms)", "kv_mib": "KV MiB", "kept_tokens": "Kept",
           "process_mem_mib": "Process MiB", "segment_ppl": "Segment PPL"}


def _forward(model, ids, cache):
    return model(ids, past_key_values=cache, use_cache=True).logits


@dataclass(eq=False)
class Run:
    policy: str
    cache: object
    bound: int | None  # budget + buffer: the most tokens a layer may hold after a forward
    status: str = OK
    stop_at: int | None = None  # first checkpoint this policy must not reach (memory plan)
    segment: list = field(default_factory=list)  # NLL [1, n] of each forward since the last checkpoint
    losses: list = field(default_factory=list)  # completed segments
    tpot_s: list = field(default_factory=list)
    first_eviction: int | None = None


def check(args) -> dict:
    policies = unique_policies(args.policies, resolve(args.policies, args.score))
    lengths = args.lengths or (CUDA_LENGTHS if args.device.startswith("cuda") else CPU_LENGTHS)
    if min(lengths) < 1 or lengths != sorted(set(lengths)):
        raise ValueError(f"--lengths must be positive and strictly increasing, got {' '.join(map(str, lengths))}")
    if args.context_chunk < 1 or args.decode_steps < 1:
        raise ValueError(f"--context-chunk and --decode-steps must be >= 1 (got {args.context_chunk}, "
                         f"{args.decode_steps})")
    for a, b in zip(lengths, lengths[1:]):
        if b < a + args.decode_steps:
            raise ValueError(f"checkpoints {a} and {b} are closer than --decode-steps {args.decode_steps}: "
                             f"the decode steps at {a} already take the context to {a + args.decode_steps}")
    return {"policies": policies, "lengths": lengths, "text": load_text(args)}


def predicted_bytes(run: Run, length: int, steps: int) -> float:
    """The run's cache bytes after the checkpoint at `length`: measured bytes per kept token x tokens kept."""
    kept = max(run.cache.kept_lengths())
    will_keep = length + steps if run.bound is None else min(length + steps, run.bound)
    return run.cache.kv_bytes() / max(kept, 1) * will_keep


def plan_memory(runs: list[Run], lengths: list[int], steps: int) -> None:
    """CPU: stop (before `length`) the biggest policies whose caches together would not fit."""
    live = [r for r in runs if r.cache is not None]
    held = sum(r.cache.kv_bytes() for r in live)
    limit = MEMORY_SHARE * (psutil.virtual_memory().available + held)
    for length in lengths:
        while True:
            growing = {r: predicted_bytes(r, length, steps) for r in live if r.stop_at is None}
            if not growing or sum(growing.values()) <= limit:
                break
            worst = max(growing, key=growing.get)
            worst.stop_at = length


def _drop(run: Run, status: str, device: torch.device) -> None:
    run.status, run.cache, run.segment = status, None, []
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _advance(model, run: Run, ids: torch.Tensor, start: int, stop: int, device) -> float:
    """Feed ids[start:stop] to the run's cache; record NLLs, check the bound; return the forward's seconds."""
    sync(device)
    began = time.perf_counter()
    logits = _forward(model, ids[:, start:stop], run.cache)
    sync(device)
    elapsed = time.perf_counter() - began
    run.segment.append(next_token_losses(logits, ids, start, stop))
    kept = check_bound(run.cache, run.bound, run.policy)
    if run.first_eviction is None and kept < stop:
        run.first_eviction = stop
    return elapsed


def _each(model, runs, ids, start, stop, device, target, timed=False) -> None:
    """One forward of every live run in turn; an out-of-memory error stops that run only."""
    for run in runs:
        if run.cache is None:
            continue
        if run.stop_at is not None and run.stop_at <= target:
            _drop(run, SKIPPED, device)
            continue
        try:
            elapsed = _advance(model, run, ids, start, stop, device)
        except RuntimeError as err:
            if isinstance(err, ValidityError) or not is_oom(err):
                raise
            elapsed = None
        if elapsed is None:  # freed here, once the traceback no longer holds the forward's tensors
            _drop(run, OOM, device)
            continue
        if timed:
            run.tpot_s.append(elapsed)


def run(session, plan) -> int:
    args, policies, lengths = session.args, plan["policies"], plan["lengths"]
    steps = args.decode_steps
    model, tokenizer = session.load_model()
    info, device = session.info, session.device
    n = lengths[-1] + steps + 1  # the last decode step's target included
    ids, source = session.token_ids(plan["text"], n)
    ids = ids.to(device)
    runs = []
    for name in policies:
        cache = h2o.make_cache(model, name, positions=args.positions, buffer=args.buffer,
                               tokenizer=runners.tokenizer_for(model, name) if parse(name).replays else None,
                               surrogate=runners.surrogate_for(model, name))
        budget = parse(name).budget
        runs.append(Run(name, cache, None if budget is None else budget + args.buffer))
    context = trained_context(model)
    mem_kind = memory.kind(device)

    rows, pos, planned = [], 0, False
    bar = session.progress(total=(lengths[-1] + steps * len(lengths)) * len(runs), desc="stress", unit="tok")
    try:
        with torch.no_grad():
            for i, length in enumerate(lengths):
                peak = memory.PeakMemory(device).start()
                while pos < length:
                    stop = min(pos + args.context_chunk, length)
                    _each(model, runs, ids, pos, stop, device, length)
                    bar.update((stop - pos) * len(runs))
                    pos = stop
                    if not planned and device.type == "cpu":  # bytes per token are measured now
                        plan_memory(runs, lengths[i:], steps)
                        planned = True
                for run_ in runs:
                    run_.tpot_s = []
                for s in range(steps):  # decode steps, interleaved policy by policy
                    _each(model, runs, ids, pos + s, pos + s + 1, device, length, timed=True)
                    bar.update(len(runs))
                pos += steps
                held = memory.current_bytes(device)
                peak.stop()
                for run_ in runs:
                    rows.append(_row(run_, length, steps, held, peak.peak, context, args.positions))
                    run_.losses += run_.segment
                    run_.segment = []
                if device.type == "cpu" and i + 1 < len(lengths):
                    plan_memory(runs, lengths[i + 1 :], steps)
    finally:
        bar.close()
        h2o.restore(model)
    _check_eviction(runs)

    notes = _notes(session, source, runs, rows, context, mem_kind, tokenizer is None)
    for row in rows:  # every row says how it was measured
        row.update(chunk=args.context_chunk, decode_steps=steps, positions=args.positions, buffer=args.buffer)
    session.write_csv("stress.csv", rows)
    session.write_json("stress.json", policies=policies, lengths=lengths, text=source, memory_kind=mem_kind,
                       trained_context=context, rows=rows, notes=notes)
    title = f"{info['name']} ({info['device']}, {info['dtype']}), positions {args.positions}, chunk {args.context_chunk}"
    for name, figure in plot(rows, title, context, mem_kind):
        session.plot(name, figure)
    return session.finish([report.format_table(rows, COLUMNS)], notes)


def _row(run: Run, length, steps, held, peak, context, positions) -> dict:
    row = {"policy": run.policy, "length": length, "status": run.status, "tpot_min_ms": None,
           "tpot_median_ms": None, "kv_bytes": None, "kv_mib": None, "kept_tokens": None,
           "process_mem_mib": None, "peak_mem_mib": None, "segment_ppl": None, "segment_tokens": None}
    # the last position this segment used; full caches keep original positions in either mode
    row["past_trained_context"] = bool(context and length + steps > context
                                       and (positions == "original" or run.bound is None))
    if run.cache is None:
        return row
    nll = torch.cat(run.segment, dim=1)
    kv = run.cache.kv_bytes()
    row.update(tpot_min_ms=1000 * min(run.tpot_s), tpot_median_ms=1000 * statistics.median(run.tpot_s),
               kv_bytes=kv, kv_mib=kv / report.MIB, kept_tokens=max(run.cache.kept_lengths()),
               process_mem_mib=held / report.MIB, peak_mem_mib=peak / report.MIB,
               segment_ppl=math.exp(nll.double().mean().item()), segment_tokens=nll.shape[1])
    return row


def _check_eviction(runs: list[Run]) -> None:
    """A compressed run whose losses equal the full cache's after its first eviction measured nothing."""
    full = next((r for r in runs if r.bound is None and r.losses), None)
    if full is None:
        return
    full_losses = torch.cat(full.losses, dim=1)
    for r in runs:
        if r.bound is None or not r.losses or r.first_eviction is None:
            continue
        losses = torch.cat(r.losses, dim=1)
        n = min(losses.shape[1], full_losses.shape[1])
        if r.first_eviction < n:
            check_eviction_in_force(PPLResult(full.policy, "chunked", full_losses[:, :n], None, 0, False),
                                    PPLResult(r.policy, "chunked", losses[:, :n], r.first_eviction, 0, False))


def _notes(session, source, runs, rows, context, mem_kind, random_weights) -> list[str]:
    args, info = session.args, session.info
    notes = [
        f"{session.model_line}; text: {source}, BOS {'on' if args.bos else 'off'}",
        f"text streamed {args.context_chunk} tokens per forward, all policies in lockstep; at each checkpoint "
        f"{args.decode_steps} single-token decode steps per policy on the next real tokens, interleaved; "
        "TPOT = one decode forward (min and median of those steps)",
        "Segment PPL: every token predicted since the previous checkpoint (chunk and decode forwards)",
        f"KV MiB: the storages that policy's cache keeps alive (kv_bytes, bookkeeping included) after the checkpoint; Process MiB: "
        f"{'process RSS' if mem_kind == 'rss' else 'torch.cuda.memory_allocated'} with every live policy's "
        "cache held at once, and Peak MiB its peak over the segment (one number per checkpoint, not per policy)",
    ]
    if random_weights:
        notes.append(f"{info['name']} has random weights: its PPL is meaningless (about the vocabulary size); "
                     "only the code path, speed and memory are measured")
    past = sorted({r["length"] for r in rows if r.get("past_trained_context")})
    if context and past:
        who = "all policies" if args.positions == "original" else "full cache only: it keeps original positions"
        notes.append(f"positions pass the model's trained context ({context}) in the segments ending at "
                     f"{', '.join(map(str, past))} ({who})")
    for r in runs:
        if r.status != OK:
            first = next(row["length"] for row in rows if row["policy"] == r.policy and row["status"] != OK)
            notes.append(f"{r.policy}: {r.status} from {first} tokens on")
        if r.bound is not None and r.first_eviction is None:
            notes.append(f"{r.policy}: the text never outgrew budget + buffer ({r.bound}): no eviction was measured")
    return notes


def _log2_axis(ax, lengths) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [f"{x // 1024}k" if x % 1024 == 0 else str(x) for x in lengths])
    ax.set_xlabel("context length (tokens, log2 scale)")
    ax.grid(True, which="both", alpha=0.3)


def _series(rows, policy, key):
    pts = [(r["length"], r[key]) for r in rows if r["policy"] == policy and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _mark_stops(ax, rows, policies, colors) -> None:
    for policy in policies:
        stopped = [r for r in rows if r["policy"] == policy and r["status"] != OK]
        if stopped:
            ax.axvline(stopped[0]["length"], color=colors[policy], ls=":", lw=1.2)
            ax.text(stopped[0]["length"], 0.98, f" {policy}: {stopped[0]['status']}", color=colors[policy],
                    transform=ax.get_xaxis_transform(), rotation=90, va="top", ha="right", fontsize=7)


def _mark_context(ax, context, lengths) -> None:
    if context and lengths[0] <= context <= lengths[-1] * 2:
        ax.axvline(context, color="gray", ls="--", lw=1, label=f"trained context ({context})")


def plot(rows, title, context, mem_kind) -> list:
    """[(file name, figure)]: TPOT, memory and segment PPL against context."""
    plt = report.pyplot()
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    colors = {p: f"C{i}" for i, p in enumerate(policies)}
    figures = []

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for p in policies:
        x, med = _series(rows, p, "tpot_median_ms")
        _, low = _series(rows, p, "tpot_min_ms")
        ax.plot(x, med, "o-", color=colors[p], label=f"{p} (median; band down to min)")
        ax.fill_between(x, low, med, color=colors[p], alpha=0.2)
    _mark_context(ax, context, lengths)
    _mark_stops(ax, rows, policies, colors)
    _log2_axis(ax, lengths)
    ax.set_ylabel("time per output token (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Decode TPOT vs context\n{title}", fontsize=9)
    ax.legend(fontsize=7)
    figures.append(("stress_tpot.png", fig))

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
    for p in policies:
        ax1.plot(*_series(rows, p, "kv_mib"), "o-", color=colors[p], label=p)
    _mark_stops(ax1, rows, policies, colors)
    _log2_axis(ax1, lengths)
    report.log_y(ax1, "KV cache size (MiB, log scale)")
    ax1.set_title("KV cache per policy (storages held)", fontsize=9)
    ax1.legend(fontsize=7)
    proc = {}
    for r in rows:
        if r["process_mem_mib"] is not None:
            proc.setdefault(r["length"], r["process_mem_mib"])
    ax2.plot(list(proc), list(proc.values()), "s-", color="k",
             label="process RSS" if mem_kind == "rss" else "CUDA allocated")
    _mark_stops(ax2, rows, policies, colors)
    _log2_axis(ax2, lengths)
    ax2.set_ylabel("process memory (MiB)")
    ax2.set_title("Process memory: model + every live policy's cache", fontsize=9)
    ax2.legend(fontsize=7)
    fig.suptitle(f"Memory vs context: {title}", fontsize=10)
    figures.append(("stress_memory.png", fig))

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for p in policies:
        ax.plot(*_series(rows, p, "segment_ppl"), "o-", color=colors[p], label=p)
    _mark_context(ax, context, lengths)
    _mark_stops(ax, rows, policies, colors)
    _log2_axis(ax, lengths)
    report.log_y(ax, "PPL of the segment since the previous checkpoint (log scale)")
    ax.set_title(f"Segment PPL vs context (lower is better)\n{title}", fontsize=9)
    ax.legend(fontsize=7)
    figures.append(("stress_ppl.png", fig))
    return figures
