"""`h2o perf`: what the cache's bookkeeping costs. Four ratios against their floors, and KV bytes vs tokens.

A compressed cache should cost what a full cache holding the same number of tokens costs. Measured as
timing must be on a noisy machine: the configurations compared advance step by step in one process
(their order rotating every step), each figure is the minimum over its rounds, and only ratios are
reported, never absolute times across runs.

- decode step: `--policy` (`h2o`) and `--streaming` caches after a `--context`-token prompt (cut back to their budget)
  and a full cache holding `budget` tokens (the prompt's last ones) take one decode step each in turn,
  `--decode-steps` times; a step's time is the forward of one new token (all layers, eviction included when it
  falls in that step). Ratios of the minimum step time (and, as a second figure, of the median).
- prefill: `--prefill` tokens into a fresh `h2o` and a fresh `streaming` cache, in turn, `--rounds` times, at each
  length of `--prefill` and each `--prefill-chunk` (0: one forward; C: forwards of C tokens, each followed by its
  eviction, and by its replay for a replaying rule); the ratio of the minimum times (the prefill cut back to the
  budget included). A replaying rule (KVzip) has its own goal: its replay is one more pass over the context.
- allocation: the `--policy` rule under each `--allocation` (head or layer budgets, `h2o.policies.allocation`) takes
  its decode steps in the same rotation; its ratio is against the same rule uniform (same average budget).
- KV bytes: the bytes the cache keeps alive (`kv_bytes`: every storage under its tensors, each once) after
  feeding 1k .. 16k tokens in chunks of `--kv-chunk`, for each policy and the full cache: flat for a compressed
  cache.
"""

from __future__ import annotations

import statistics

import torch

from h2o.policies import parse

from .. import compiled as compiled_steps
from .. import parts
from .. import report
from ..session import load_text
from ..runners import open_runner
from ..speed import _run_step, timed

NAME = "perf"
HELP = "bookkeeping cost: decode-step and prefill time ratios against their floors, KV bytes vs tokens"
GOALS = {  # ratio -> the goal of issue 11 (the floor is 1.0)
    "decode_h2o_over_streaming": 1.03,
    "decode_h2o_over_full": 1.05,
    "decode_streaming_over_full": 1.02,
    "prefill_h2o_over_streaming": 1.15,
    "prefill_replaying_over_streaming": 2.2,  # issue 41: a replaying rule's prefill (KVzip: + its replay); 2.0 floor
    "decode_allocated_over_h2o": 1.05,  # issue 18: head budgets cost at most 5% over the same rule uniform
    "decode_compiled_h2o_over_compiled_full": 1.05,  # issue 19: compiled h2o vs transformers' compiled StaticCache
    "decode_compiled_streaming_over_compiled_full": None,  # reported, no goal
    "decode_compiled_h2o_over_eager_h2o": None,
    "decode_compiled_h2o_over_floor": None,  # the floor: weight bytes / measured copy bandwidth
}
ALLOCATED = "allocated:"  # the decode-step keys of the allocations: allocated:<allocation>
TABLE = {"ratio": "Ratio", "at": "At", "min": "Min", "median": "Median", "goal": "Goal", "met": "Met"}


def check(args) -> dict:
    h2o_policy, streaming = parse(args.policy, args.score), parse(args.streaming)
    if not h2o_policy.evicts or not streaming.evicts:
        raise ValueError("--policy and --streaming must be evicting policies")
    if h2o_policy.budget != streaming.budget:
        raise ValueError(f"--policy {h2o_policy.name} (budget {h2o_policy.budget}) and --streaming {streaming.name} "
                         f"(budget {streaming.budget}) must keep the same number of tokens")
    budget = h2o_policy.budget
    if args.context <= budget + args.buffer:
        raise ValueError(f"--context {args.context} must exceed budget + buffer ({budget} + {args.buffer}), "
                         "or the timed caches never evicted")
    if min(args.prefill) <= budget + args.buffer:
        raise ValueError(f"--prefill {min(args.prefill)} must exceed budget + buffer ({budget} + {args.buffer})")
    if min(args.prefill_chunk) < 0 or any(c >= min(args.prefill) for c in args.prefill_chunk):
        raise ValueError(f"--prefill-chunk {' '.join(map(str, args.prefill_chunk))}: each must be 0 (one forward) or "
                         f"a chunk shorter than every --prefill ({min(args.prefill)})")
    allocations = [] if args.allocation == ["none"] else list(dict.fromkeys(args.allocation))
    if args.decode_steps < 2 or args.rounds < 1 or args.kv_chunk < 1 or min(args.kv_lengths) < 1:
        raise ValueError("--decode-steps must be >= 2; --rounds, --kv-chunk and --kv-lengths must be >= 1")
    if args.warmup < (1 if args.compile else 0):
        raise ValueError(f"--warmup must be >= {1 if args.compile else 0}" +
                         (" with --compile (the first compiled step compiles)" if args.compile else ""))
    if args.compile and args.positions != "original":
        raise ValueError("--compile times the static (compile-friendly) layout, which keeps original positions: "
                         "leave --positions at original")
    if args.compile:
        from h2o.models import layer_windows

        from .. import checkpoints
        if any(layer_windows(checkpoints.load_config(args.model))):
            raise ValueError(f"--compile times the static (compile-friendly) layout, which holds every layer alike; "
                             f"{args.model} has sliding-window layers: leave out --compile")
    if (args.compile_mode or args.compile_backend != "inductor") and not args.compile:
        raise ValueError("--compile-mode and --compile-backend apply with --compile")
    needed = max(args.context, max(args.prefill), max(args.kv_lengths))
    policies = {"h2o": h2o_policy.name, "streaming": streaming.name}
    for allocation in allocations:
        policies[ALLOCATED + allocation] = parse(f"{allocation}+{h2o_policy.name}").name
    return {"policies": policies, "budget": budget,
            "text": load_text(args), "tokens": needed, "kv_lengths": sorted(set(args.kv_lengths))}


def decode_steps(session, ids, policies: dict[str, str], budget: int, steps: int,
                 compiled: dict | None = None) -> tuple[dict[str, list[float]], dict[str, list[int]], int]:
    """Per configuration, the time of each of `steps` decode steps, the configurations interleaved; the tokens
    each produced; the graphs dynamo compiled during the timed steps. `compiled`: {key: CompiledRunner}, warmed
    up before the timed steps and timed in the same rotation."""
    a, model, device = session.args, session.model, session.device
    prompt = ids[:, :a.context].to(device)
    caches = {key: open_runner(model, name, a.positions, a.buffer) for key, name in policies.items()}
    caches["full"] = open_runner(model, "full", a.positions, a.buffer)
    nxt = {key: _run_step(cache, prompt if key != "full" else prompt[:, -budget:]) for key, cache in caches.items()}
    steppers = {key: (lambda key: lambda: _run_step(caches[key], nxt[key]))(key) for key in caches}
    for key, step in steppers.items():  # the eager configurations take the compiled ones' warm-up steps too
        for _ in range(a.warmup):
            nxt[key] = step()
    for key, runner in (compiled or {}).items():
        nxt[key] = runner.warm_up(runner.prefill(prompt), prompt, a.warmup, device)
        steppers[key] = (lambda key, runner: lambda: runner.step(runner.ready(nxt[key], prompt)))(key, runner)
    times = {key: [] for key in steppers}
    tokens = {key: [] for key in steppers}
    graphs_warm = compiled_steps.graphs_compiled()
    order = list(steppers)
    bar = session.progress(total=steps * len(order), desc="decode steps")
    for s in range(steps):
        for key in order[s % len(order):] + order[:s % len(order)]:
            seconds, nxt[key] = timed(device, steppers[key])
            times[key].append(seconds)
            tokens[key].append(int(nxt[key][0, 0]))
            bar.update()
    bar.close()
    return times, tokens, compiled_steps.graphs_compiled() - graphs_warm


def prefill_label(tokens: int, chunk: int) -> str:
    return f"prefill {tokens}, " + ("one forward" if chunk == 0 else f"chunks of {chunk}")


def _prefill(cache, prompt, chunk: int):
    if chunk == 0:
        return _run_step(cache, prompt)
    for start in range(0, prompt.shape[1], chunk):
        token = _run_step(cache, prompt[:, start:start + chunk])
    return token


def prefills(session, ids, policies: dict[str, str], rounds: int) -> dict[str, dict[str, list[float]]]:
    """{prefill label: {key: seconds per round}}: at each --prefill length and --prefill-chunk, a fresh cache of each
    policy prefilled in turn, `rounds` times, the order rotating."""
    a, model, device = session.args, session.model, session.device
    order = list(policies)
    shapes = [(n, c) for n in a.prefill for c in a.prefill_chunk]
    times = {prefill_label(n, c): {key: [] for key in order} for n, c in shapes}
    bar = session.progress(total=rounds * len(order) * len(shapes), desc="prefills")
    for n, c in shapes:
        prompt = ids[:, :n].to(device)
        for r in range(rounds):
            for key in order[r % len(order):] + order[:r % len(order)]:
                cache = open_runner(model, policies[key], a.positions, a.buffer)  # fresh each round
                seconds, _ = timed(device, lambda: _prefill(cache, prompt, c))
                times[prefill_label(n, c)][key].append(seconds)
                bar.update()
    bar.close()
    return times


def prefill_parts(session, ids, policies: dict[str, str]) -> list[dict]:
    """Rows {part, h2o: ms, streaming: ms}: profiled --prefills of each (fresh caches), by part, the lower of two."""
    a, model, device = session.args, session.model, session.device
    prompt = ids[:, :max(a.prefill)].to(device)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    names = parts.PARTS + parts.REST
    times = {key: dict.fromkeys(names, float("inf")) for key in ("h2o", "streaming")}
    for _ in range(2):  # interleaved; each part's minimum (a first profiled call pays the profiler's start-up)
        for key in times:
            cache = open_runner(model, policies[key], a.positions, a.buffer)
            got = parts.profile_prefill(model, lambda: _run_step(cache, prompt), head_dim, device)
            times[key] = {part: min(times[key][part], got[part]) for part in names}
    rows = [{"part": part, **{key: times[key][part] for key in times}} for part in names]
    rows.append({"part": "attention modules, in all", **{key: sum(times[key].values()) for key in times}})
    return rows


def kv_bytes(session, ids, policies: list[str], lengths: list[int], chunk: int) -> list[dict]:
    """Rows {policy, tokens, kv_bytes}: each policy's cache bytes after feeding each of `lengths` tokens."""
    a, model, device = session.args, session.model, session.device
    rows = []
    bar = session.progress(total=len(policies) * max(lengths), desc="KV bytes", unit="tok")
    for name in policies:
        cache, fed = open_runner(model, name, a.positions, a.buffer), 0
        for target in lengths:
            while fed < target:
                stop = min(target, fed + chunk)
                _run_step(cache, ids[:, fed:stop].to(device))
                bar.update(stop - fed)
                fed = stop
            rows.append({"policy": name, "tokens": target, "kv_bytes": cache.kv_bytes(),
                         "kv_mib": cache.kv_bytes() / report.MIB, "kept_per_layer": max(cache.kept_lengths())})
        del cache
    bar.close()
    return rows


def ratio_rows(decode: dict[str, list[float]], prefill: dict[str, dict[str, list[float]]],
               floor_s: float | None = None, replays: bool = False, at: str = "decode") -> list[dict]:
    """The ratios; `replays`: --policy replays the context (KVzip), whose prefill includes the replay (its own goal).
    `prefill`: {label: {key: seconds}} (`prefills`); `at`: what the decode rows were timed after."""
    def row(key, where, num, den):
        lo, mid = min(num) / min(den), statistics.median(num) / statistics.median(den)
        goal = GOALS[key]
        return {"ratio": key, "at": where, "min": lo, "median": mid, "goal": "–" if goal is None else goal,
                "met": "–" if goal is None else "yes" if lo <= goal else "no"}

    rows = [row("decode_h2o_over_streaming", at, decode["h2o"], decode["streaming"]),
            row("decode_h2o_over_full", at, decode["h2o"], decode["full"]),
            row("decode_streaming_over_full", at, decode["streaming"], decode["full"])]
    rows += [row("prefill_replaying_over_streaming" if replays else "prefill_h2o_over_streaming", label, times["h2o"],
                 times["streaming"]) for label, times in prefill.items()]
    rows += [row("decode_allocated_over_h2o", f"{key.removeprefix(ALLOCATED)}, {at}", times, decode["h2o"])
             for key, times in decode.items() if key.startswith(ALLOCATED)]
    if "h2o_compiled" in decode:
        rows += [row("decode_compiled_h2o_over_compiled_full", at, decode["h2o_compiled"], decode["full_compiled"]),
                 row("decode_compiled_streaming_over_compiled_full", at, decode["streaming_compiled"],
                     decode["full_compiled"]),
                 row("decode_compiled_h2o_over_eager_h2o", at, decode["h2o_compiled"], decode["h2o"]),
                 row("decode_compiled_h2o_over_floor", at, decode["h2o_compiled"], [floor_s])]
    return rows


def run(session, plan) -> int:
    a = session.args
    model, _ = session.load_model()
    ids, source = session.token_ids(plan["text"], plan["tokens"])
    if ids.shape[1] < plan["tokens"]:
        raise ValueError(f"{source} has only {ids.shape[1]} tokens; perf needs {plan['tokens']} "
                         "(--context, --prefill, --kv-lengths)")
    policies, budget = plan["policies"], plan["budget"]
    names = {**policies, "full": f"full holding {budget}"}
    compiled, floor_s, extra = None, None, {}
    if a.compile:
        mode = a.compile_mode or compiled_steps.default_mode(session.device)
        compiled = {f"{key}_compiled": compiled_steps.CompiledRunner(model, name, budget, a.buffer, mode,
                                                                     a.compile_backend)
                    for key, name in (("h2o", policies["h2o"]), ("streaming", policies["streaming"]), ("full", "full"))}
        capacity = compiled["full_compiled"].capacity
        names.update(h2o_compiled=f"{policies['h2o']} static, compiled",
                     streaming_compiled=f"{policies['streaming']} static, compiled",
                     full_compiled=f"StaticCache of {capacity} slots, compiled")
    with torch.no_grad():
        if a.compile:
            bandwidth = compiled_steps.copy_bandwidth(session.device)
            weights = compiled_steps.weight_bytes(model)
            floor_s = weights / bandwidth
        decode, tokens, recompiled = decode_steps(session, ids, policies, budget, a.decode_steps, compiled)
        prefill = prefills(session, ids, {k: v for k, v in policies.items() if not k.startswith(ALLOCATED)},
                           a.rounds)
        kv = kv_bytes(session, ids, ["full", *policies.values()], plan["kv_lengths"], a.kv_chunk)
        part_rows = prefill_parts(session, ids, policies) if a.prefill_parts else []
    ratios = ratio_rows(decode, prefill, floor_s, replays=parse(a.policy, a.score).replays,
                        at=f"decode after {a.context}")
    timing = [{"configuration": names[k], "kind": "decode", "min_ms": 1000 * min(v),
               "median_ms": 1000 * statistics.median(v), "samples": len(v)} for k, v in decode.items()]
    timing += [{"configuration": names[k], "kind": label, "min_ms": 1000 * min(v),
                "median_ms": 1000 * statistics.median(v), "samples": len(v)}
               for label, times in prefill.items() for k, v in times.items()]
    compile_notes = []
    if a.compile:
        timing.append({"configuration": f"floor: {weights / report.MIB:.0f} MiB of weights at "
                                        f"{bandwidth / 1e9:.1f} GB/s copy bandwidth", "kind": "decode",
                       "min_ms": 1000 * floor_s, "median_ms": 1000 * floor_s, "samples": 1})
        same = {key: sum(x == y for x, y in zip(tokens[f"{key}_compiled"], tokens[key])) for key in ("h2o", "streaming")}
        extra = {"compile": {"mode": mode, "backend": a.compile_backend, "capacity": capacity,
                             "compile_s": {k: r.compile_s for k, r in compiled.items()},
                             "graphs_compiled_during_timed_steps": recompiled, "weight_bytes": weights,
                             "copy_bandwidth_bytes_s": bandwidth, "floor_s": floor_s,
                             "same_tokens_as_eager": same}}
        compile_notes = [
            f"compiled: torch.compile(model.forward, backend={a.compile_backend}"
            f"{f', mode={mode}' if a.compile_backend == 'inductor' else ''}, fullgraph=True, dynamic=False), "
            f"{a.warmup} warm-up steps; compile time (first step) " +
            ", ".join(f"{names[k]} {r.compile_s:.1f} s" for k, r in compiled.items()),
            f"graphs compiled during the timed steps: {recompiled}" +
            ("" if recompiled == 0 else " (RECOMPILED: the compiled figures include compile time)"),
            f"the compiled static caches attend {capacity} slots each step (budget + buffer + 1), the StaticCache "
            f"holds {budget}..{capacity} tokens (reset and prefilled again, untimed, when full); same tokens as the "
            f"eager cache over the {a.decode_steps} timed steps: " + ", ".join(f"{policies[k]} {n}/{a.decode_steps}"
                                                                      for k, n in same.items()),
            f"floor: weight bytes ({weights / report.MIB:.0f} MiB) / the bandwidth of one 256 MiB copy (read + "
            f"write, fastest of 7: {bandwidth / 1e9:.1f} GB/s) = {1000 * floor_s:.1f} ms; KV and activations left out"]
    notes = [session.model_line,
             f"text: {source}",
             f"decode: after a {a.context}-token prompt ({names['full']}: the prompt's last {plan['budget']} tokens), "
             f"{a.decode_steps} steps interleaved step by step, order rotating; prefill: "
             f"{' and '.join(map(str, a.prefill))} tokens, "
             + " and ".join("one forward" if c == 0 else f"chunks of {c}" for c in a.prefill_chunk)
             + f", {a.rounds} interleaved rounds each; ratios of the minimum (median beside it); only ratios compare "
             "across runs",
             f"KV bytes: the storages the cache keeps alive (kv_bytes: each once, whole), fed in chunks of {a.kv_chunk} tokens",
             *compile_notes]
    session.write_csv("perf.csv", ratios)
    session.write_csv("perf_timing.csv", timing)
    session.write_csv("perf_kv.csv", kv)
    tables_parts = []
    if part_rows:
        session.write_csv("perf_parts.csv", part_rows)
        extra["prefill_parts"] = part_rows
        tables_parts = [report.format_table(part_rows, {"part": "Part", **{k: names[k] for k in ("h2o", "streaming")}})]
        notes.append(f"prefill parts: {max(a.prefill)}-token prefills (one forward) under torch.profiler, ms summed over all layers, "
                     "each part the lower of 2 interleaved rounds "
                     "(profiler time, inflated by its own overhead per operator: compare the parts with each "
                     "other and with SDPA, not with the unprofiled prefill); h2o.eval.parts says what each part is")
    session.write_json("perf.json", ratios=ratios, timing=timing, kv=kv, notes=notes,
                       decode_s=decode, prefill_s=prefill, **extra)
    session.plot("perf.png", plot(kv, session.info["name"]))
    kv_table = report.format_table(
        [{"policy": r["policy"], "tokens": r["tokens"], "kv_mib": r["kv_mib"], "kept": r["kept_per_layer"]} for r in kv],
        {"policy": "Policy", "tokens": "Tokens fed", "kv_mib": "KV MiB", "kept": "Kept per layer"})
    timing_table = report.format_table(timing, {"configuration": "Configuration", "kind": "Step",
                                                "min_ms": "Min (ms)", "median_ms": "Median (ms)",
                                                "samples": "Samples"})
    return session.finish([report.format_table(ratios, TABLE), timing_table, kv_table, *tables_parts], notes)


def plot(kv_rows, model_name):
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["policy"] for r in kv_rows):
        rows = [r for r in kv_rows if r["policy"] == name]
        ax.plot([r["tokens"] for r in rows], [r["kv_mib"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    report.log_y(ax, "KV cache, MiB (log)")
    ax.set_xlabel("tokens fed")
    ax.set_title(f"h2o perf: {model_name}\nKV bytes held after each length", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
