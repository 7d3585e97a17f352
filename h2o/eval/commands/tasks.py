"""`h2o tasks`: synthetic retrieval tasks under each policy, scored only where the full cache succeeds.

Perplexity hides what a policy forgets; a retrieval task shows it, but only if the model can solve
the case at all. So every case also runs with the full cache under the same protocol, and a case
counts for a policy only where the full cache solved it (the full-cache control):

    kept share = cases the policy solved, among those the full cache solved / cases the full cache solved

A task whose full cache solved fewer than `--min-solved` cases gets no score (and no paired test): the model cannot do
it at that length, and a policy's failures there would be the model's.

`--protocol multi-question` and `multi-turn` ask `--questions` needles of one context (niah_multikey's keys,
kv_retrieval's pairs): the first question's prompt compressed once, then every question from its own fork of it, or
the questions in turn in one conversation. Every table then has a row per question index (1st, 2nd, ...), each
scored against the full cache's answers to that same question, so what a policy loses on the follow-ups shows.

Protocols, answers and scoring: `h2o.eval.answers` (the harness the command runs on) and
`h2o.eval.retrieval` (case generation, RULER's string_match_all, exact first number for passkey).
"""

from __future__ import annotations

import statistics

from h2o.models import layer_windows

from .. import checkpoints, data, report, retrieval
from ..answers import POOLED, check_budgets, check_context, compare, run_cases, summarize, variants
from ..runners import describe, is_press

NAME = "tasks"
HELP = "retrieval tasks (passkey, RULER NIAH, key-value, variable tracking) with a full-cache control"
COLUMNS = {"task": "Task", "phrasing": "Phrasing", "question": "Question", "policy": "Policy", "budget": "Budget",
           "budget_share": "Budget / prompt", "kv_mib": "KV MiB", "answer_held": "Answer held",
           "cases": "Cases", "full_solved": "Full solved", "full_interval": "Full solved [95%]",
           "policy_solved": "Policy solved", "kept_share": "Kept share", "interval": "Kept [95%]",
           "policy_accuracy": "Policy acc.", "full_accuracy": "Full acc."}
PAIRED_COLUMNS = {"task": "Task", "phrasing": "Phrasing", "question": "Question", "budget": "Budget",
                  "policy_a": "A", "policy_b": "B",
                  "cases": "Cases", "a_solved": "A solved", "b_solved": "B solved", "a_only": "A only",
                  "b_only": "B only", "p_value": "p (McNemar)", "verdict": "Verdict"}
TURN_TOKENS = 64  # at most a follow-up's turn: the chat template's turn, the question and the answer opening


def columns(table: dict, protocol: str) -> dict:
    """A table's columns: the question index only where a case asks several."""
    return table if protocol in retrieval.MULTI_PROTOCOLS else {k: v for k, v in table.items() if k != "question"}


# --- the command ---------------------------------------------------------------------------------------

def check(args) -> dict:
    unknown = [t for t in args.tasks if t not in retrieval.TASKS]
    if unknown:
        raise ValueError(f"unknown task {unknown[0]!r}; choose from {', '.join(retrieval.TASKS)}")
    if args.model.startswith("random:"):
        raise ValueError(f"{args.model} has random weights and no tokenizer: retrieval tasks need a pretrained model")
    if args.questions < 2:
        raise ValueError(f"--questions must be >= 2 (a follow-up needs a first question), got {args.questions}")
    multi = args.protocol in retrieval.MULTI_PROTOCOLS
    one = [t for t in args.tasks if t not in retrieval.MULTI_QUESTION_TASKS]
    if multi and one:
        raise ValueError(f"--protocol {args.protocol} asks several questions of one context, and "
                         + "; ".join(f"{t} asks one ({retrieval.ONE_QUESTION[t]})" for t in one)
                         + f". The tasks that serve it: {', '.join(retrieval.MULTI_QUESTION_TASKS)} "
                           f"(--tasks {' '.join(retrieval.MULTI_QUESTION_TASKS)})")
    bad = [d for d in args.depths if not 0.0 <= d <= 1.0]
    if bad:
        raise ValueError(f"--depths must lie in [0, 1], got {bad[0]}")
    if args.cases < 1:
        raise ValueError(f"--cases must be >= 1, got {args.cases}")
    if args.context_chunk < 1 or args.min_solved < 1:
        raise ValueError(f"--context-chunk and --min-solved must be >= 1 (got {args.context_chunk}, {args.min_solved})")
    if min(args.lengths) < 1:
        raise ValueError(f"--lengths must be positive, got {min(args.lengths)}")
    if args.budgets is None and not all(0 < r < 1 for r in args.budget_ratio):
        raise ValueError(f"--budget-ratio must lie in (0, 1), got {' '.join(map(str, args.budget_ratio))}")
    variant_list = variants(args.policies, args.budgets, None if args.budgets else args.budget_ratio, args.score)
    if not variant_list:
        raise ValueError("no policy to compare with the full cache: give --policies")
    prefill_presses = [v.label for v in variant_list if is_press(v.label) and not describe(v.label).decoding]
    if args.protocol == "streaming" and prefill_presses:
        raise ValueError(f"{prefill_presses[0]}: a kvpress prefill press compresses only the first forward, so under "
                         "--protocol streaming (the context fed --context-chunk tokens a forward) it would not bound the "
                         "cache; use kvpress:decoding:<press> or --protocol question-aware")
    presses = [v.label for v in variant_list if is_press(v.label)]
    if args.protocol == "multi-question" and presses:
        raise ValueError(f"{presses[0]}: --protocol multi-question answers every question from a fork of the "
                         "compressed context (CompressedCache.fork), and a kvpress press runs on kvpress's own cache "
                         "and hooks, which cannot be forked; run our policies there (or the press under --protocol "
                         "multi-turn as kvpress:decoding:<press>)")
    if args.protocol == "multi-turn" and prefill_presses:
        raise ValueError(f"{prefill_presses[0]}: a kvpress prefill press compresses only the first forward, so under "
                         "--protocol multi-turn the answers and the later questions would grow the cache uncompressed; "
                         "use kvpress:decoding:<press> or --protocol question-aware")
    lengths = sorted(set(args.lengths))
    check_budgets([v.policy(lengths[0], args.score) for v in variant_list], lengths[0], args.buffer, "prompt",
                  "use longer --lengths, a smaller budget or --buffer")
    answer = max(retrieval.max_new_tokens(t, p) for t in args.tasks for p in args.phrasings)
    # what follows the first prompt: its answer; and a follow-up's turn and answer; or every answer and turn in turn
    after = {"multi-question": 2 * answer + TURN_TOKENS, "multi-turn": args.questions * (answer + TURN_TOKENS)}
    check_context(args.model, args.positions, lengths[-1], after.get(args.protocol, answer),
                  "prompt" if not multi else f"{args.protocol} conversation")
    if args.text_file:
        haystacks = {"file": data.load_text_file(args.text_file)[0]}
    else:
        haystacks = {}
        for corpus in args.corpus:
            for doc in (args.pg19_book if corpus == "pg19" else [None]):
                text, _ = data.load_document(corpus, doc, args.data_dir)
                haystacks[f"pg19/{doc}" if corpus == "pg19" else "wikitext"] = text
    return {"variants": variant_list, "lengths": lengths, "haystacks": haystacks}


def run(session, plan) -> int:
    args = session.args
    model, tokenizer = session.load_model()
    multi = args.protocol in retrieval.MULTI_PROTOCOLS
    cases = [c for task in args.tasks for phrasing in args.phrasings for c in
             retrieval.generate_cases(task, tokenizer, plan["haystacks"], plan["lengths"], args.depths, args.cases,
                                      args.seed, phrasing=phrasing, questions=args.questions if multi else 1)]
    variant_list = plan["variants"]
    rows = run_cases(model, tokenizer, cases, variant_list, args.protocol, chunk=args.context_chunk,
                     positions=args.positions, buffer=args.buffer, score=args.score, run_units=session.run_units)
    summary, notes = summarize(rows, args.min_solved)
    paired = compare(rows, args.min_solved)
    protocol = f"protocol {args.protocol}" + {
        "streaming": f" (context fed {args.context_chunk} tokens per forward)",
        "multi-question": f" ({args.questions} questions per context: the first question's prompt compressed once, "
                          "in one prefill; every question answered from its own fork of it, a follow-up after the "
                          "first answer)",
        "multi-turn": f" ({args.questions} questions per context in turn in one conversation: the first question's "
                      "prompt in one prefill, each answer kept in the cache, the next question after it)",
    }.get(args.protocol, " (one prefill)")
    notes = [session.model_line,
             f"{protocol}; {len(cases)} cases: tasks {', '.join(args.tasks)}, lengths "
             f"{' '.join(map(str, plan['lengths']))}, depths {' '.join(map(str, args.depths))}, {args.cases} per cell, "
             f"seed {args.seed}; phrasings {', '.join(args.phrasings)} (crossed: the same draws in each; 'all' rows pool "
             f"them); haystacks: {', '.join(plan['haystacks'])}; greedy answers",
             "Kept share = cases the policy solved among those the full cache solved (the full-cache control) / "
             f"cases the full cache solved; no score where the full cache solved fewer than {args.min_solved}; "
             "Policy acc. = mean score over all cases (RULER string_match_all; passkey: exact first number); "
             "Kept [95%] = Wilson interval of the kept share; Full solved [95%] = Wilson interval of the full "
             "cache's solved share (its row); KV MiB = what the cache holds once the prompt is in (kv_bytes(): every "
             "storage it keeps alive, keys, values and bookkeeping, each once), mean over the cases; "
             "Answer held = share of the answer's tokens in the needle statements (per layer the policy holds, KV "
             "head and token) still in the cache once the prompt is in, mean over the cases: a policy that evicted "
             "the answer cannot give it, one that held it and still failed lost something else (– where unknown: a "
             "kvpress press, a tokenizer without offsets)",
             "paired: every two policies at one budget on the kept share's cases, McNemar's exact test; 'not "
             "separated' = p >= 0.05, the cases do not say which is better",
             *notes]
    if multi:
        notes.insert(3, "Question = which question of the context (1: the first, asked in the compressed prompt; 2 on: "
                        "the follow-ups, " + ("each asked after the first question and the policy's answer to it, "
                                             "on its own fork of the compressed state" if args.protocol ==
                                             "multi-question" else "each asked after the previous answer, in the "
                                             "same cache") +
                     "); every row's kept share is over the cases whose full cache solved that same question; KV MiB "
                     "is what the cache holds right after the compression (the first question's prompt), the same for "
                     "every question of a case; Answer held and Budget / prompt are read once that question's prompt "
                     "is in; a case's wall time under a policy (the compression and every question) is its unit's "
                     "seconds in tasks_units.jsonl")
    if any(is_press(v.label) and describe(v.label).adakv for v in variant_list):
        notes.append("kvpress:adakv:<press> is kvpress's AdaKVPress: it keeps every prompt token and masks each KV "
                     "head's evicted ones in attention (head budgets simulated), so its KV MiB is that of every prompt "
                     "token in every layer (the full cache's; on a model with sliding-window layers more, since "
                     "kvpress's cache does not bound them); its Budget is the average kept per head")
    if any(is_press(v.label) for v in variant_list) and any(layer_windows(checkpoints.load_config(args.model))):
        notes.append("kvpress on a model with sliding-window layers: its presses compress every layer at the same "
                     "share, the sliding-window ones included, in a cache without the model's window bound; h2o's "
                     "policies compress the full-attention layers only and keep the model's own window layers")
    session.write_csv("tasks.csv", summary)
    session.write_csv("tasks_cases.csv", rows)
    session.write_csv("tasks_paired.csv", paired)
    session.write_json("tasks.json", protocol=args.protocol, questions=args.questions if multi else 1,
                       summary=summary, paired=paired, cases=rows, notes=notes)
    title = f"{session.info['name']}, {protocol}"
    if multi:
        session.plot("tasks_kept_by_question.png", plot_kept_by_question(summary, title))
    else:
        session.plot("tasks_kept_share.png", plot_kept_share(summary, title))
    if "passkey" in args.tasks:
        session.plot("tasks_passkey_grid.png", plot_grid([r for r in rows if r["task"] == "passkey"], title))
    tables = [report.format_table(summary, columns(COLUMNS, args.protocol))]
    if paired:
        tables.append("paired (McNemar exact):\n" + report.format_table(paired, columns(PAIRED_COLUMNS, args.protocol)))
    return session.finish(tables, notes)


# --- plots ---------------------------------------------------------------------------------------------

def _task_axes(summary: list[dict]):
    """One axis per task, and the rows to plot: pooled over the phrasings where several ran (else the one phrasing)."""
    plt = report.pyplot()
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    pooled = {t: any(r["phrasing"] == POOLED for r in summary if r["task"] == t) for t in tasks}
    summary = [r for r in summary if not pooled[r["task"]] or r["phrasing"] == POOLED]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False, layout="constrained")
    return fig, axes, tasks, summary


def plot_kept_share(summary: list[dict], title: str):
    """Kept share vs budget per task, pooled over the phrasings (the one phrasing when only one ran), with the
    Wilson 95% interval as error bars."""
    fig, axes, tasks, summary = _task_axes(summary)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary if r["task"] == task and r["policy"] != "full"]
        full = next(r for r in summary if r["task"] == task and r["policy"] == "full")
        for i, policy in enumerate(dict.fromkeys(r["policy"] for r in rows)):
            pts = sorted((r["budget_share"], r["kept_share"], r["kept_low"], r["kept_high"]) for r in rows
                         if r["policy"] == policy and r["kept_share"] is not None)
            if pts:
                x, y, low, high = zip(*pts)
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                            fmt="os^D"[i % 4] + "-", color=f"C{i}", label=policy, capsize=3)
        if all(r["kept_share"] is None for r in rows):
            ax.text(0.5, 0.5, f"not scored: the full cache solved\n{full['full_solved']} of {full['cases']} cases",
                    ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("budget / prompt tokens")
        ax.set_ylabel("kept share (of the full cache's solved cases)")
        ax.set_title(f"{task} (full cache solved {full['full_solved']}/{full['cases']})", fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Retrieval kept vs budget (95% Wilson intervals; phrasings pooled): {title}", fontsize=9)
    return fig


def plot_kept_by_question(summary: list[dict], title: str):
    """The multi-question protocols: kept share vs question index per task, one line per policy and budget (pooled
    over the phrasings where several ran), with the Wilson 95% interval as error bars; the full cache's solved share
    of each question in grey."""
    fig, axes, tasks, summary = _task_axes(summary)
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in summary if r["task"] == task]
        full = sorted((r["question"], r["full_solved"] / r["cases"]) for r in rows if r["policy"] == "full")
        ax.plot(*zip(*full), "--", color="gray", label="full cache: solved share")
        for i, run in enumerate(dict.fromkeys((r["policy"], r["budget"]) for r in rows if r["policy"] != "full")):
            pts = sorted((r["question"], r["kept_share"], r["kept_low"], r["kept_high"]) for r in rows
                         if (r["policy"], r["budget"]) == run and r["kept_share"] is not None)
            if pts:
                x, y, low, high = zip(*pts)
                ax.errorbar(x, y, yerr=[[a - b for a, b in zip(y, low)], [b - a for a, b in zip(y, high)]],
                            fmt="os^D"[i % 4] + "-", color=f"C{i}", label=f"{run[0]} @ {run[1]}", capsize=3)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xticks(sorted({r["question"] for r in rows}))
        ax.set_xlabel("question (1: asked in the compressed prompt)")
        ax.set_ylabel("kept share (of the full cache's solved cases)")
        ax.set_title(task, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Retrieval kept per question (95% Wilson intervals; phrasings pooled): {title}", fontsize=9)
    return fig


def plot_grid(rows: list[dict], title: str):
    """Depth x length per policy: the share of cases solved in each cell; the full cache's panel first.
    Cells where the full cache solved nothing are grey: they say nothing about the policy."""
    plt = report.pyplot()
    import numpy as np

    panels = list(dict.fromkeys((r["policy"], r["budget"]) for r in rows))
    depths = sorted({r["depth"] for r in rows})
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 + 1.1 * len(lengths) * len(panels), 0.5 * len(depths) + 2),
                             squeeze=False, layout="constrained")
    for ax, (policy, budget) in zip(axes[0], panels):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                cell = [r for r in rows if (r["policy"], r["budget"]) == (policy, budget)
                        and r["depth"] == d and r["length"] == n and (r["full_solved"] or policy == "full")]
                if cell:
                    grid[i, j] = statistics.mean(float(r["solved"]) for r in cell)
                text = "–" if not cell else f"{sum(r['solved'] for r in cell)}/{len(cell)}"
                ax.text(j, i, text, ha="center", va="center", fontsize=7)
        ax.imshow(np.ma.masked_invalid(grid), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_facecolor("#cccccc")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title("full cache" if policy == "full" else f"{policy} @ {budget}", fontsize=8)
    fig.suptitle(f"Passkey solved per cell (policies: among the full cache's solved cases)\n{title}", fontsize=8)
    return fig
