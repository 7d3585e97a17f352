"""Retrieval cases answered under each policy, scored against the full-cache control: the harness that
`h2o tasks`, and the retrieval columns of `h2o bench` and `h2o sweep`, run on.

Protocols (named in every output; the control always runs the same one):
- question-aware: the whole prompt, question included, in one forward; the cache is compressed
  after it (what kvpress and SnapKV measure). The prompt's last token is fed after the compression,
  so every answer token is predicted from the compressed cache, none from the full prefill.
- streaming: the context is fed `chunk` tokens per forward with eviction in force throughout
  (the memory-bounded case), then the question (suffix) on the compressed cache.
Answers are greedy, token by token on the cache, until EOS or the task's `max_new_tokens`; every
layer's cache must stay within budget + buffer after every forward (`ValidityError` otherwise),
and a case whose prompt never made the policy evict is reported as not compressed, never scored.
Case generation and scoring (RULER's string_match_all, exact first number for passkey) are in
`h2o.eval.retrieval`.
"""

from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

import torch

import h2o
from h2o.policies import is_family, resolve

from . import checkpoints, report, retrieval
from .runners import canonical, describe, is_press, open_runner, policy_name
from .units import Unit

PROTOCOLS = ("question-aware", "streaming")


@dataclass(frozen=True)
class Variant:
    """A policy as the tasks run it: a fixed name, or a family sized to a share of each prompt."""

    label: str  # what the tables call it: the policy name, or the family
    budget: str  # "256" (tokens) or "20%" (of the asked length)
    name: str | None = None  # fixed policy name
    ratio: float | None = None  # family: budget = round(ratio * length)

    def policy(self, length: int, score: str | None = None) -> str:
        if self.name is not None:
            return self.name
        if is_press(self.label):  # a kvpress press sized like our families: the same kept tokens
            return describe(self.label).at(round(self.ratio * length)).name
        return resolve([policy_name(self.label, round(self.ratio * length), score)])[0]


def variants(policies: list[str], budgets: list[int] | None, ratios: list[float] | None,
             score: str | None) -> list[Variant]:
    """Families become one variant per budget (tokens) or ratio; other names are used as they are.

    Names and families that give the same policies (h2o_4_8_64 and h2o_4_8_64_mean; families h2o and
    h2o_mean) are run once, with a printed note."""
    out = []  # (what the user wrote, variant)
    for p in policies:
        if p == "full":
            continue
        if is_press(p) and not describe(p).sized:  # kvpress:<press>: sized like a family
            press = describe(p)
            if budgets:
                out += [(p, Variant(press.name, str(b), name=press.at(b).name)) for b in budgets]
            else:
                out += [(p, Variant(press.name, f"{r:.0%}", ratio=r)) for r in ratios]
        elif is_family(p):
            if budgets:
                out += [(p, Variant(p, str(b), name=resolve([policy_name(p, b, score)])[0])) for b in budgets]
            else:
                out += [(p, Variant(p, f"{r:.0%}", ratio=r)) for r in ratios]
        else:
            name = canonical([p], score)[0]
            out.append((p, Variant(name, budget_label(name), name=name)))
    merged: dict[object, list[tuple[str, Variant]]] = {}
    for given, v in out:
        # a family's policy at one length fixes it at every length (same rule, same share)
        key = v.name if v.name is not None else (v.ratio, v.policy(1024, score))
        merged.setdefault(key, []).append((given, v))
    for same in merged.values():
        if len(same) > 1:
            first = same[0][1]
            what = f"policy {first.name}" if first.name else f"policies ({first.label} at {first.budget})"
            print(f"note: --policies {', '.join(given for given, _ in same)} give the same {what}: it runs once")
    return [same[0][1] for same in merged.values()]


def budget_label(name: str) -> str:
    """The Budget column of a fixed policy name: its tokens, or the share a kvpress ratio keeps."""
    policy = describe(name)
    return str(policy.budget) if policy.budget is not None else f"{1 - policy.ratio:.0%}"


@dataclass
class Answer:
    text: str
    score: float
    prompt_tokens: int
    kept_tokens: int  # the longest layer's kept length once the prompt is in
    compressed: bool  # the policy evicted while the prompt was fed
    budget_tokens: int | None = None  # what the policy keeps of this prompt (None: everything)
    kv_bytes: int = 0  # what the cache holds once the prompt is in (every head's buffers, bookkeeping included)

    @property
    def solved(self) -> bool:
        return self.score == 1.0


def respond(model, tokenizer, case: retrieval.Case, policy: str, protocol: str, *, chunk: int = 256,
            positions: str = "original", buffer: int = 64) -> Answer:
    """Feed the case's prompt under `protocol` into a `policy` cache, then answer greedily on it."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    prefix, context, suffix = retrieval.case_token_ids(tokenizer, case)
    ids = prefix + context + suffix
    if protocol == "question-aware":
        feeds = [ids[:-1]]
    else:
        head = prefix + context
        feeds = [head[i : i + chunk] for i in range(0, len(head), chunk)] + [suffix[:-1]]
    runner = open_runner(model, policy, positions=positions, buffer=buffer)
    device = next(model.parameters()).device
    stop = _eos_ids(model, tokenizer)
    try:
        with torch.no_grad():
            for feed in filter(None, feeds):
                runner.forward(torch.tensor([feed], device=device), logits_to_keep=1)
                runner.check()
            kept, compressed, kv = max(runner.kept_lengths()), runner.compressed(), runner.kv_bytes()
            token, out = ids[-1], []
            for _ in range(case.max_new_tokens):
                logits = runner.forward(torch.tensor([[token]], device=device), logits_to_keep=1)
                runner.check()
                token = int(logits[0, -1].argmax())
                if token in stop:
                    break
                out.append(token)
    finally:
        runner.close()
    text = tokenizer.decode(out, skip_special_tokens=True)
    return Answer(text, retrieval.score(case, text), len(ids), kept, compressed, runner.budget_for(len(ids) - 1), kv)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def answer_unit(model, tokenizer, spec: dict) -> dict:
    """A unit of work (h2o.eval.units): one case under one policy, answered; the Answer as a dict."""
    case = retrieval.Case(**{**spec["case"], "references": tuple(spec["case"]["references"]),
                             "needles": tuple(spec["case"]["needles"])})
    try:
        answer = respond(model, tokenizer, case, spec["policy"], spec["protocol"], chunk=spec["chunk"],
                         positions=spec["positions"], buffer=spec["buffer"])
    finally:
        if model is not None:
            h2o.restore(model)
    return dataclasses.asdict(answer)


def case_unit(case: retrieval.Case, policy: str, protocol: str, chunk: int, positions: str, buffer: int) -> Unit:
    return Unit("answer", f"{protocol}:{case.task}:{case.length}:{case.depth}:{case.index}:{policy}",
                {"case": dataclasses.asdict(case), "policy": policy, "protocol": protocol,
                 "chunk": chunk, "positions": positions, "buffer": buffer})


def run_cases(model, tokenizer, cases: list[retrieval.Case], variant_list: list[Variant], protocol: str, *,
              chunk: int, positions: str, buffer: int, score: str | None = None, bar=None,
              run_units=None) -> list[dict]:
    """One row per case and policy, the full cache first: its answer is every row's control. Each (case, policy)
    answer is a unit, the full cache's once per case; `run_units` (a Session's: in this process or on Ray,
    resumable) runs them, by default here, one after another."""
    kw = dict(protocol=protocol, chunk=chunk, positions=positions, buffer=buffer)
    plan = [(case, [("full", "–", "full")] + [(v.label, v.budget, v.policy(case.length, score)) for v in variant_list])
            for case in cases]
    work = [case_unit(case, name, **kw) for case, runs in plan for _, _, name in runs]
    if run_units is None:
        results = {}
        for unit in work:
            results[unit.key] = answer_unit(model, tokenizer, unit.spec)
            if bar is not None:
                bar.update()
    else:
        results = run_units(work, desc=f"tasks ({protocol})")
    rows = []
    for case, runs in plan:
        full = Answer(**results[case_unit(case, "full", **kw).key])
        for label, budget, name in runs:
            answer = Answer(**results[case_unit(case, name, **kw).key])
            rows.append(_case_row(case, label, budget, name, protocol, answer, full))
    return rows


def _case_row(case, label, budget, name, protocol, answer: Answer, full: Answer) -> dict:
    p = describe(name)
    return {"task": case.task, "length": case.length, "depth": case.depth, "index": case.index,
            "protocol": protocol, "policy": label, "budget": budget, "policy_name": p.name,
            "budget_tokens": answer.budget_tokens if answer.budget_tokens is not None else p.budget,
            "prompt_tokens": answer.prompt_tokens, "kept_tokens": answer.kept_tokens,
            "kv_mib": answer.kv_bytes / report.MIB,
            "compressed": answer.compressed if p.evicts else None, "score": answer.score, "solved": answer.solved,
            "full_solved": full.solved, "references": " | ".join(case.references), "answer": answer.text,
            "source": case.source}


def summarize(rows: list[dict], min_solved: int) -> tuple[list[dict], list[str]]:
    """Per task, policy and budget: cases, the full cache's solved cases, the policy's among them, kept share."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["task"], r["policy"], r["budget"]), []).append(r)
    out, notes = [], []
    for (task, policy, budget), group in groups.items():
        scored = [r for r in group if r["compressed"] is not False]  # full rows: None; uncompressed: excluded
        control = [r for r in scored if r["full_solved"]]
        solved = sum(r["solved"] for r in control)
        enough = len([r for r in group if r["full_solved"]]) >= min_solved
        row = {"task": task, "protocol": group[0]["protocol"], "policy": policy, "budget": budget,
               "budget_share": None if policy == "full" else statistics.mean(
                   r["budget_tokens"] / r["prompt_tokens"] for r in group),
               "kv_mib": statistics.mean(r["kv_mib"] for r in group),
               "cases": len(group), "not_compressed": len(group) - len(scored),
               "full_solved": sum(r["full_solved"] for r in group),
               "control": len(control) if policy != "full" else None,  # full-solved cases it was scored on
               "policy_solved": solved if policy != "full" else None,
               "kept_share": solved / len(control) if enough and control and policy != "full" else None,
               "policy_accuracy": statistics.mean(r["score"] for r in group),
               "full_accuracy": statistics.mean(float(r["full_solved"]) for r in group),
               "lengths": " ".join(map(str, sorted({r["length"] for r in group})))}
        if row["not_compressed"]:
            notes.append(f"{task}, {policy} at {budget}: {row['not_compressed']} case(s) never made the cache evict "
                         "(the budget held the prompt): not scored")
        out.append(row)
    for task in dict.fromkeys(r["task"] for r in rows):
        full = next(r for r in out if r["task"] == task and r["policy"] == "full")
        if full["full_solved"] < min_solved:
            notes.append(f"{task}: the full cache solved {full['full_solved']} of {full['cases']} cases at length(s) "
                         f"{full['lengths']}, fewer than --min-solved {min_solved}: the model cannot do this task "
                         "there, so no policy is scored on it")
    return out, notes


def check_budgets(policies: list[str], length: int, buffer: int, prompt: str, hint: str) -> None:
    """Before the model loads: every policy's budget + buffer leaves something of a `length`-token prompt to
    compress (prompts are within 5% of the asked length, and the prefill must outgrow budget + buffer to evict)."""
    for name in policies:
        policy = describe(name)
        slack = 0 if is_press(name) and not policy.decoding else buffer  # a prefill press cuts the prompt at once
        if policy.evicts and policy.budget is not None and policy.budget + slack >= 0.95 * length - 1:
            raise ValueError(f"{name}: budget + buffer ({policy.budget} + {slack}) holds the whole {length}-token "
                             f"{prompt}, so nothing would be compressed; {hint}")


def check_context(model: str, positions: str, length: int, new_tokens: int, prompt: str) -> None:
    """Before the model loads: with original positions, a `length`-token prompt plus the answer fits the model's
    trained context."""
    if positions != "original":
        return
    trained = getattr(checkpoints.load_config(model), "max_position_embeddings", None)
    if trained and length + new_tokens > trained:
        raise ValueError(f"{prompt}s of {length} tokens plus the answer pass the model's trained context of "
                         f"{trained} with positions 'original'; use --positions reindex or shorter prompts")


def check_passkey(policies: list[str], length: int, buffer: int, model: str, positions: str,
                  task_names: tuple[str, ...] = ("passkey",)) -> None:
    """The retrieval columns of bench and sweep: something to compress, and inside the trained context."""
    unknown = [t for t in task_names if t not in retrieval.TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(retrieval.TASKS)}")
    check_budgets(policies, length, buffer, "task prompt", "raise --passkey-length")
    check_context(model, positions, length, max(retrieval.MAX_NEW_TOKENS[t] for t in task_names), "task prompt")


def passkey_kept(session, policies: list[str], haystacks: dict[str, str], n: int, length: int) -> tuple[dict, str]:
    """n passkey cases of `length` tokens (depths spread over 0.1-0.9), question-aware, under every policy with
    the full-cache control: ({policy: its summary row}, a note saying how it was measured)."""
    kept, note = tasks_kept(session, policies, haystacks, ["passkey"], n, length)
    return kept["passkey"], note


def tasks_kept(session, policies: list[str], haystacks: dict[str, str], task_names: list[str], n: int,
               length: int) -> tuple[dict, str]:
    """n cases of `length` tokens per task (depths spread over 0.1-0.9), question-aware, under every policy with
    the full-cache control: ({task: {policy: its summary row}}, a note saying how it was measured)."""
    args = session.args
    depths = [0.5] if n == 1 else [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]
    cases = [c for task in task_names
             for c in retrieval.generate_cases(task, session.tokenizer, haystacks, [length], depths, 1, 0)]
    variant_list = [Variant(p, budget_label(p), name=p) for p in policies if p != "full"]
    rows = run_cases(session.model, session.tokenizer, cases, variant_list, "question-aware", chunk=args.chunk,
                     positions=args.positions, buffer=args.buffer, run_units=session.run_units)
    summary, notes = summarize(rows, min_solved=1)
    what = "passkey" if list(task_names) == ["passkey"] else "retrieval"
    note = (f"{what.capitalize()} kept: {n} {' / '.join(task_names)} cases of {length} tokens"
            f"{' each' if len(task_names) > 1 else ''} (depths 0.1-0.9, haystacks {', '.join(haystacks)}), "
            "question-aware protocol; full: cases it solved; policies: solved among the full cache's solved cases "
            "(the full-cache control; `h2o tasks` has more cases and lengths)")
    kept = {task: {r["policy"]: r for r in summary if r["task"] == task} for task in task_names}
    return kept, "; ".join([note, *notes])
