"""Retrieval cases answered under each policy, scored against the full-cache control: the harness that
`h2o tasks`, and the retrieval columns of `h2o bench` and `h2o sweep`, run on.

Protocols (named in every output; the control always runs the same one):
- question-aware: the whole prompt, question included, in one forward; the cache is compressed
  after it (what kvpress and SnapKV measure). The prompt's last token is fed after the compression,
  so every answer token is predicted from the compressed cache, none from the full prefill.
- streaming: the context is fed `chunk` tokens per forward with eviction in force throughout
  (the memory-bounded case), then the question (suffix) on the compressed cache.
- multi-question (cases with follow-ups, `retrieval.generate_cases(questions=...)`): the first question's prompt
  less its last token in one forward, as question-aware: the compression, once per case and the same feeds for
  every rule (a rule that reads the question, SnapKV, sees the first one there, as a user who sends the document
  with a first question; KVzip replays the context there, once). Every question is then answered from its own
  fork of that state (`cache.fork()`: the state itself never changes): question 1 by feeding the prompt's last
  token (its answer is the question-aware protocol's), question i > 1 by feeding, in one forward, that token, the
  first answer's tokens as the policy gave them and question i's turn (the end of the assistant's turn, the user's
  turn with question i, the assistant's header and answer opening), less its last token, then the answer: every
  follow-up is asked in a conversation [question 1, its answer, question i], a branch of its own.
- multi-turn: the same compression, then the questions in turn in one conversation on the one cache: each answer
  is decoded on it and kept (the cache evicting as it decodes), the next question's turn fed after it.
Under both, a row per question (`question`, 1-based), each with its own full-cache control (the full cache's
answer to that question under the same protocol) and scored with the case's scorer on that question's references.
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
from .retrieval import MULTI_PROTOCOLS, PROTOCOLS
from .runners import canonical, describe, is_press, open_runner, policy_name
from .stats import interval_text, mcnemar, wilson
from .units import Unit


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
    answer_held: list[float] | None = None  # per layer the policy holds, the share of the answer's context tokens
    # (over its KV heads) held once the prompt is in; None: not known (a kvpress press, a tokenizer without offsets)
    kept_per_layer: list[int] | None = None  # tokens each layer the policy holds keeps once the prompt is in
    question: int = 1  # which question of the case (1-based; the multi-question protocols ask several)

    @property
    def solved(self) -> bool:
        return self.score == 1.0


def respond(model, tokenizer, case: retrieval.Case, policy: str, protocol: str, *, chunk: int = 256,
            positions: str = "original", buffer: int = 64) -> Answer:
    """Feed the case's prompt under `protocol` into a `policy` cache, then answer greedily on it."""
    if protocol in MULTI_PROTOCOLS:
        raise ValueError(f"{protocol} asks several questions of a case: respond_questions answers them")
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
            answer, _, _ = _ask(runner, tokenizer, case, 1, len(prefix), len(ids) - 1, ids[-1], stop, device)
    finally:
        runner.close()
    return answer


def respond_questions(model, tokenizer, case: retrieval.Case, policy: str, protocol: str, *,
                      positions: str = "original", buffer: int = 64) -> list[Answer]:
    """Every question of `case` under `protocol` (multi-question or multi-turn, module docstring) in a `policy` cache:
    the first question's prompt (less its last token) fed once, in one forward (the compression); then each
    question answered from its own fork of that state, a follow-up after the first answer (multi-question), or
    in turn on the one cache, each answer kept (multi-turn). One Answer per question, in order: its KV bytes are
    those held right after the compression (the same for every question of the case: what is kept while they are
    asked; a fork holds a copy of it while it answers), what else it says of the cache (kept tokens, answer held,
    evicted) is read once that question's prompt is in (question 1: right after the compression). The wall time of
    the case (every question) is its unit's, in the ledger (`h2o.eval.units`), as for the other protocols."""
    if protocol not in MULTI_PROTOCOLS:
        raise ValueError(f"respond_questions runs {' and '.join(MULTI_PROTOCOLS)}, not {protocol!r}")
    if case.questions < 2:
        raise ValueError(f"{protocol} asks several questions of one context, and this {case.task} case asks one "
                         "(generate_cases(..., questions=n))")
    prefix, context, suffix = retrieval.case_token_ids(tokenizer, case)
    first = prefix + context + suffix
    turns = retrieval.turn_token_ids(tokenizer, case)
    runner = open_runner(model, policy, positions=positions, buffer=buffer)
    if protocol == "multi-question" and not hasattr(runner, "fork"):
        runner.close()
        raise ValueError(f"{policy}: multi-question answers every question from a fork of the compressed context, "
                         "and this runner's cache cannot be forked")
    device = next(model.parameters()).device
    stop = _eos_ids(model, tokenizer)
    out = []
    try:
        with torch.no_grad():
            _feed(runner, first[:-1], device)  # the compression: once per case
            kv = runner.kv_bytes()
            if protocol == "multi-question":
                reply = []  # the first answer's ids, as the policy gave them
                for question in range(1, case.questions + 1):
                    feed = [] if question == 1 else [first[-1]] + reply + turns[question - 2][:-1]
                    last = first[-1] if question == 1 else turns[question - 2][-1]
                    fork = runner.fork()
                    try:
                        _feed(fork, feed, device)
                        answer, ids, _ = _ask(fork, tokenizer, case, question, len(prefix),
                                              len(first) - 1 + len(feed), last, stop, device)
                    finally:
                        fork.close()
                    reply = ids if question == 1 else reply
                    out.append(answer)
            else:
                fed, unfed = len(first) - 1, []  # tokens in the cache; the answer's last one where the limit ended it
                for question in range(1, case.questions + 1):
                    feed = [] if question == 1 else unfed + turns[question - 2][:-1]
                    last = first[-1] if question == 1 else turns[question - 2][-1]
                    _feed(runner, feed, device)
                    fed += len(feed)
                    answer, ids, unfed = _ask(runner, tokenizer, case, question, len(prefix), fed, last, stop, device)
                    fed += 1 + len(ids) - len(unfed)  # `last` and the answer (a stop token is never fed)
                    out.append(answer)
    finally:
        runner.close()
    return [dataclasses.replace(a, kv_bytes=kv) for a in out]


def _feed(runner, ids: list[int], device) -> None:
    """One forward of `ids` (nothing where there are none), the cache checked after it."""
    if ids:
        runner.forward(torch.tensor([ids], device=device), logits_to_keep=1)
        runner.check()


def _ask(runner, tokenizer, case: retrieval.Case, question: int, prefix_tokens: int, fed: int, last: int,
         stop: set[int], device) -> tuple[Answer, list[int], list[int]]:
    """Question `question` answered on `runner`, whose cache holds its prompt (`fed` tokens) but the last token,
    `last`: what the cache holds now, then the greedy answer. (the Answer, the answer's ids, those of them not fed:
    the last one where the task's limit, not a stop token, ended the answer)."""
    per_layer, compressed, kv = runner.kept_lengths(), runner.compressed(), runner.kv_bytes()
    where = retrieval.answer_positions(tokenizer, case, prefix_tokens, question)
    answer_held = None if where is None else runner.kept_share(where)
    token, out, unfed = last, [], []
    for _ in range(case.max_new_tokens):
        logits = runner.forward(torch.tensor([[token]], device=device), logits_to_keep=1)
        runner.check()
        token = int(logits[0, -1].argmax())
        if token in stop:
            break
        out.append(token)
    else:
        unfed = out[-1:]
    text = tokenizer.decode(out, skip_special_tokens=True)
    answer = Answer(text, retrieval.score(case, text, question), fed + 1, max(per_layer), compressed,
                    runner.budget_for(fed), kv, answer_held, list(per_layer), question=question)
    return answer, out, unfed


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def answer_unit(model, tokenizer, spec: dict) -> dict:
    """A unit of work (h2o.eval.units): one case under one policy, answered; the Answer as a dict."""
    case = retrieval.Case.from_dict(spec["case"])
    try:
        if spec["protocol"] in MULTI_PROTOCOLS:  # one answer per question
            return {"answers": [dataclasses.asdict(a) for a in respond_questions(
                model, tokenizer, case, spec["policy"], spec["protocol"], positions=spec["positions"],
                buffer=spec["buffer"])]}
        answer = respond(model, tokenizer, case, spec["policy"], spec["protocol"], chunk=spec["chunk"],
                         positions=spec["positions"], buffer=spec["buffer"])
    finally:
        if model is not None:
            h2o.restore(model)
    return dataclasses.asdict(answer)


def unit_answers(result: dict) -> list[Answer]:
    """The answers of a unit's result, one per question (one for a single-question protocol)."""
    return [Answer(**a) for a in result["answers"]] if "answers" in result else [Answer(**result)]


def case_unit(case: retrieval.Case, policy: str, protocol: str, chunk: int, positions: str, buffer: int) -> Unit:
    fields = dataclasses.asdict(case)
    if not case.follow_ups:  # a single-question case's unit is what it was before follow-ups existed (its key too)
        del fields["follow_ups"]
    return Unit("answer", f"{protocol}:{case.task}:{case.phrasing}:{case.length}:{case.depth}:{case.index}:{policy}",
                {"case": fields, "policy": policy, "protocol": protocol,
                 "chunk": chunk, "positions": positions, "buffer": buffer})


def run_cases(model, tokenizer, cases: list[retrieval.Case], variant_list: list[Variant], protocol: str, *,
              chunk: int, positions: str, buffer: int, score: str | None = None, bar=None,
              run_units=None) -> list[dict]:
    """One row per case, policy and question (one question but under the multi-question protocols), the full cache
    first: its answer to the same question is every row's control. Each (case, policy) answer, all its questions, is
    a unit, the full cache's once per case; `run_units` (a Session's: in this process or on Ray,
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
        full = unit_answers(results[case_unit(case, "full", **kw).key])
        for label, budget, name in runs:
            for answer, control in zip(unit_answers(results[case_unit(case, name, **kw).key]), full, strict=True):
                rows.append(_case_row(case, label, budget, name, protocol, answer, control))
    return rows


def _case_row(case, label, budget, name, protocol, answer: Answer, full: Answer) -> dict:
    p = describe(name)
    return {"task": case.task, "phrasing": case.phrasing, "length": case.length, "depth": case.depth,
            "index": case.index, "question": answer.question,
            "protocol": protocol, "policy": label, "budget": budget, "policy_name": p.name,
            "budget_tokens": answer.budget_tokens if answer.budget_tokens is not None else p.budget,
            "prompt_tokens": answer.prompt_tokens, "kept_tokens": answer.kept_tokens,
            "kv_mib": answer.kv_bytes / report.MIB,
            "answer_held": None if answer.answer_held is None else statistics.mean(answer.answer_held),
            "answer_held_per_layer": _listed(answer.answer_held, "{:.2f}"),
            "kept_per_layer": _listed(answer.kept_per_layer, "{}"),
            "compressed": answer.compressed if p.evicts else None, "score": answer.score, "solved": answer.solved,
            "full_solved": full.solved, "references": " | ".join(case.references_of(answer.question)),
            "answer": answer.text, "source": case.source}


POOLED = "all"  # the phrasing of a summary row over every phrasing run


def _listed(values: list | None, form: str) -> str | None:
    return None if values is None else " ".join(form.format(v) for v in values)


def _mean(values: list) -> float | None:
    """The mean, where every value is known (None otherwise: a mean over some cases would mislead)."""
    return None if not values or any(v is None for v in values) else statistics.mean(values)


def _question(row: dict) -> int:
    return row.get("question", 1)  # rows written before the multi-question protocols ask one


def _asked(question: int, several: bool) -> str:
    """', question n' where the rows ask several questions of a case, else nothing."""
    return f", question {question}" if several else ""


def summarize(rows: list[dict], min_solved: int) -> tuple[list[dict], list[str]]:
    """Per task, phrasing, question index (1-based; 1 for the single-question protocols), policy and budget: cases,
    the full cache's solved cases, the policy's among them (the full cache's answers to the same question), the kept
    share with its Wilson 95% interval; with more than one phrasing, also each task pooled over them (phrasing
    "all")."""
    groups: dict[tuple, list[dict]] = {}
    phrasings: dict[str, set] = {}
    several = any(_question(r) > 1 for r in rows)
    for r in rows:
        phrasings.setdefault(r["task"], set()).add(r["phrasing"])
    for r in rows:
        groups.setdefault((r["task"], r["phrasing"], _question(r), r["policy"], r["budget"]), []).append(r)
        if len(phrasings[r["task"]]) > 1:
            groups.setdefault((r["task"], POOLED, _question(r), r["policy"], r["budget"]), []).append(r)
    out, notes = [], []
    for (task, phrasing, question, policy, budget), group in groups.items():
        scored = [r for r in group if r["compressed"] is not False]  # full rows: None; uncompressed: excluded
        control = [r for r in scored if r["full_solved"]]
        solved = sum(r["solved"] for r in control)
        full_solved = sum(r["full_solved"] for r in group)
        enough = full_solved >= min_solved
        kept = wilson(solved, len(control)) if enough and control and policy != "full" else None
        full_ci = wilson(full_solved, len(group)) if policy == "full" else None
        row = {"task": task, "phrasing": phrasing, "question": question, "protocol": group[0]["protocol"],
               "policy": policy, "budget": budget,
               "budget_share": None if policy == "full" else statistics.mean(
                   r["budget_tokens"] / r["prompt_tokens"] for r in group),
               "kv_mib": statistics.mean(r["kv_mib"] for r in group),
               "answer_held": _mean([r.get("answer_held") for r in group]),
               "cases": len(group), "not_compressed": len(group) - len(scored),
               "full_solved": full_solved,
               "control": len(control) if policy != "full" else None,  # full-solved cases it was scored on
               "policy_solved": solved if policy != "full" else None,
               "kept_share": solved / len(control) if kept is not None else None,
               "kept_low": kept[0] if kept else None, "kept_high": kept[1] if kept else None,
               "full_low": full_ci[0] if full_ci else None, "full_high": full_ci[1] if full_ci else None,
               "interval": interval_text(kept) if policy != "full" else None,  # the kept share's
               "full_interval": interval_text(full_ci) if policy == "full" else None,  # the full cache's solved share
               "policy_accuracy": statistics.mean(r["score"] for r in group),
               "full_accuracy": statistics.mean(float(r["full_solved"]) for r in group),
               "lengths": " ".join(map(str, sorted({r["length"] for r in group})))}
        if row["not_compressed"] and phrasing != POOLED:
            notes.append(f"{task} ({phrasing}{_asked(question, several)}), {policy} at {budget}: "
                         f"{row['not_compressed']} case(s) never made the cache evict (the budget held the prompt): "
                         "not scored")
        out.append(row)
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    order = {p: i for i, p in enumerate((*retrieval.PHRASINGS, POOLED))}
    policies = list(dict.fromkeys((r["policy"], r["budget"]) for r in out))
    out.sort(key=lambda r: (tasks.index(r["task"]), order[r["phrasing"]], r["question"],
                            policies.index((r["policy"], r["budget"]))))
    for task, phrasing, question in dict.fromkeys((r["task"], r["phrasing"], r["question"]) for r in out):
        full = next(r for r in out if (r["task"], r["phrasing"], r["question"]) == (task, phrasing, question)
                    and r["policy"] == "full")
        if full["full_solved"] < min_solved:
            notes.append(unscored_note(task, phrasing, full["full_solved"], full["cases"], full["lengths"], min_solved,
                                       _asked(question, several)))
    return out, notes


def unscored_note(task: str, phrasing: str, solved: int, cases: int, lengths: str, min_solved: int,
                  asked: str = "") -> str:
    """Why a task gets no score: too few cases run to reach --min-solved, or a model that rarely solves it. `asked`:
    ', question n' where the cases ask several."""
    said = (f"{task} ({phrasing}{asked}): the full cache solved {solved} of {cases} cases at length(s) {lengths}, "
            f"fewer than --min-solved {min_solved}, so no policy is scored on it")
    if solved * 2 >= cases:  # the model does the task: the run was too small to score it
        return said + (": too few cases to score; run more (--cases, --depths, --lengths, --phrasings) or lower "
                       "--min-solved")
    return said + ": the model rarely solves this task there in this phrasing (more cases will not change that; a "                   "shorter length or another phrasing may)"


def compare(rows: list[dict], min_solved: int = 1) -> list[dict]:
    """Every two policies at the same budget on the same cases (per task, phrasing and question index, and pooled
    over phrasings): McNemar's exact test on the cases the full cache solved and both policies compressed (the kept
    share's cases); the full cache is one of the policies. verdict: which is better where p < ALPHA, else not
    separated. A task and phrasing whose full cache solved fewer than `min_solved` cases (of that question) is not
    compared (it is not scored)."""
    keyed: dict[tuple, dict] = {}
    for r in rows:
        keyed[r["task"], r["phrasing"], r["length"], r["depth"], r["index"], _question(r), r["policy"],
              r["budget"]] = r
    phrasings = {t: sorted({r["phrasing"] for r in rows if r["task"] == t}, key=retrieval.PHRASINGS.index)
                 for t in {r["task"] for r in rows}}
    out = []
    for task, question in dict.fromkeys((r["task"], _question(r)) for r in rows):
        sets = [[p] for p in phrasings[task]] + ([phrasings[task]] if len(phrasings[task]) > 1 else [])
        budgets = list(dict.fromkeys(r["budget"] for r in rows if r["task"] == task and r["policy"] != "full"))
        for chosen in sets:
            mine = [r for r in rows if r["task"] == task and r["phrasing"] in chosen and _question(r) == question]
            if sum(r["full_solved"] for r in mine if r["policy"] == "full") < min_solved:
                continue
            for budget in budgets:
                policies = ["full"] + list(dict.fromkeys(r["policy"] for r in mine
                                                         if r["budget"] == budget and r["policy"] != "full"))
                for i, a in enumerate(policies):
                    for b in policies[i + 1:]:
                        pairs = []
                        for r in mine:
                            if r["policy"] != b or r["budget"] != budget:
                                continue
                            other = keyed.get((*[r[k] for k in ("task", "phrasing", "length", "depth", "index")],
                                               question, a, "–" if a == "full" else budget))
                            if other is None or not r["full_solved"] or False in (r["compressed"], other["compressed"]):
                                continue
                            pairs.append((other["solved"], r["solved"]))
                        if not pairs:
                            continue
                        test = mcnemar([x for x, _ in pairs], [y for _, y in pairs])
                        verdict = "not separated" if not test["supported"] else (
                            f"{a} better" if test["a_only"] > test["b_only"] else f"{b} better")
                        out.append({"task": task, "phrasing": chosen[0] if len(chosen) == 1 else POOLED,
                                    "question": question, "budget": budget, "policy_a": a, "policy_b": b,
                                    "cases": test["cases"],
                                    "a_solved": test["both"] + test["a_only"], "b_solved": test["both"] + test["b_only"],
                                    "a_only": test["a_only"], "b_only": test["b_only"], "p_value": test["p_value"],
                                    "verdict": verdict})
    return out


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


def check_passkey(policies: list[str], lengths: int | list[int], buffer: int, model: str, positions: str,
                  task_names: tuple[str, ...] = ("passkey",), phrasings: tuple[str, ...] = retrieval.PHRASINGS) -> None:
    """The retrieval columns of bench and sweep (their --lengths): something to compress in the shortest prompt, the
    longest inside the trained context."""
    unknown = [t for t in task_names if t not in retrieval.TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(retrieval.TASKS)}")
    lengths = sorted({lengths} if isinstance(lengths, int) else set(lengths))
    check_budgets(policies, lengths[0], buffer, "task prompt", "raise --lengths")
    check_context(model, positions, lengths[-1],
                  max(retrieval.max_new_tokens(t, p) for t in task_names for p in phrasings), "task prompt")


def passkey_kept(session, policies: list[str], haystacks: dict[str, str], n: int, lengths: int | list[int],
                 phrasings: list[str] | None = None) -> tuple[dict, str]:
    """n passkey cases of each of `lengths` tokens (depths spread over 0.1-0.9) in each phrasing, question-aware,
    under every policy with the full-cache control: ({policy: its summary row, pooled over the phrasings}, a
    note)."""
    kept, note, _ = tasks_kept(session, policies, haystacks, ["passkey"], n, lengths, phrasings)
    return kept["passkey"], note


def tasks_kept(session, policies: list[str], haystacks: dict[str, str], task_names: list[str], n: int,
               lengths: int | list[int], phrasings: list[str] | None = None, protocol: str = "question-aware",
               chunk: int | None = None) -> tuple[dict, str, list[dict]]:
    """n cases of each of `lengths` tokens per task and phrasing (depths spread over 0.1-0.9; phrasings default: each
    task's retrieval.DEFAULT_PHRASING), under `protocol` (question-aware, or streaming: the context fed `chunk` tokens
    per forward), under every policy with the full-cache control: ({task: {policy: its summary row, pooled over the
    phrasings}}, a note saying how it was measured, the paired tests of `compare` pooled over the phrasings)."""
    if protocol not in PROTOCOLS or protocol in MULTI_PROTOCOLS:
        raise ValueError(f"tasks_kept asks one question per case: question-aware or streaming, not {protocol!r}")
    if protocol == "streaming" and (chunk is None or chunk < 1):
        raise ValueError(f"the streaming protocol feeds the context in chunks: give chunk >= 1, got {chunk}")
    args = session.args
    lengths = [lengths] if isinstance(lengths, int) else list(dict.fromkeys(lengths))
    depths = [0.5] if n == 1 else [round(0.1 + 0.8 * i / (n - 1), 4) for i in range(n)]
    cases = [c for task in task_names for phrasing in (phrasings or [retrieval.DEFAULT_PHRASING[task]])
             for c in retrieval.generate_cases(task, session.tokenizer, haystacks, lengths, depths, 1, 0,
                                               phrasing=phrasing)]
    variant_list = [Variant(p, budget_label(p), name=p) for p in policies if p != "full"]
    # chunk: unused by the question-aware protocol (one prefill); the PPL chunk there, as before, keeps the units' keys
    rows = run_cases(session.model, session.tokenizer, cases, variant_list, protocol,
                     chunk=chunk if protocol == "streaming" else args.ppl_chunk, positions=args.positions,
                     buffer=args.buffer, run_units=session.run_units)
    summary, notes = summarize(rows, min_solved=1)
    what = "passkey" if list(task_names) == ["passkey"] else "retrieval"
    worded = (f"phrasings {', '.join(phrasings)}, pooled" if phrasings and len(phrasings) > 1 else
              f"phrasing {phrasings[0] if phrasings else ' / '.join(retrieval.DEFAULT_PHRASING[t] for t in task_names)}")
    note = (f"{what.capitalize()} kept: {n} {' / '.join(task_names)} cases of {' / '.join(map(str, lengths))} tokens"
            f"{' each' if len(task_names) > 1 or len(lengths) > 1 else ''} per phrasing (depths 0.1-0.9, haystacks "
            f"{', '.join(haystacks)}; "
            f"{worded}), {protocol} protocol{f' (context in chunks of {chunk} tokens)' if protocol == 'streaming' else ''}; full: cases it solved; policies: solved among the full cache's "
            "solved cases (the full-cache control), with the Wilson 95% interval of the share; `h2o tasks` has "
            "more cases, lengths and phrasings, and the paired tests")
    pooled = {task: POOLED if any(r["phrasing"] == POOLED for r in summary if r["task"] == task) else None
              for task in task_names}
    kept = {task: {r["policy"]: r for r in summary if r["task"] == task
                   and (pooled[task] is None or r["phrasing"] == POOLED)} for task in task_names}
    paired = [c for c in compare(rows) if pooled[c["task"]] is None or c["phrasing"] == POOLED]
    return kept, "; ".join([note, *notes]), paired


def kept_text(row: dict) -> str:
    """A kept cell: 'solved/cases [low, high]' (the full cache: its solved cases), 'n/c' when never compressed."""
    if row["policy"] == "full":
        return f"{row['full_solved']}/{row['cases']} {interval_text((row['full_low'], row['full_high']))}"
    if row["not_compressed"] == row["cases"]:
        return "n/c"
    return f"{row['policy_solved']}/{row['control']} {row['interval']}"


def supported_note(paired: list[dict], what: str) -> str:
    """One line: which differences of `paired` McNemar's exact test supports at 5%, and how many it does not."""
    real = [c for c in paired if c["verdict"] != "not separated"]
    said = "; ".join(f"{c['verdict']} than {c['policy_b'] if c['verdict'].startswith(c['policy_a']) else c['policy_a']}"
                     f" ({c['a_solved']} vs {c['b_solved']} of {c['cases']}, p = {c['p_value']:.3f})" for c in real)
    return (f"{what}, paired (McNemar exact, 5%): " + (said if real else "no two policies separated") +
            f"; {len(paired) - len(real)} of {len(paired)} pairs not separated by these cases")
