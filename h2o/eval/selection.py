"""The joint criterion that picks `h2o.recommended`, over measured results (`h2o choose` runs it).

Inputs are what the commands wrote: `h2o sweep --parts ppl --texts ...` (sweep.json: each rule family's gap closed
per text and budget, with its block-bootstrap interval) and `h2o tasks` (tasks.json: kept shares per task, phrasing
and budget, pooled over the phrasings, with the McNemar tests of every two policies), one run per protocol, on
tuning cases and, apart, on held-out ones. Every comparison is against the reference rule (StreamingLLM) at the
same budget on the same texts or cases.

A *cell* is one place a candidate can be below the reference:
- perplexity: one text at one budget. Below: a higher perplexity than the reference's (a gap closed < 0 where the
  text has a gap; where StreamingLLM is within noise of the full cache there is no gap, and the perplexities are
  compared directly). Surely below: the gap's whole 95% interval under 0.
- retrieval: one task in one protocol, phrasing (each, and pooled) and budget. Below: fewer of the full cache's
  solved cases kept than the reference keeps. Surely below: McNemar's exact test says the reference is better.

The criterion, on the tuning cells only (held-out ones are reported, never used):
1. eligible: below the reference in no tuning cell;
2. among the eligible, the largest worst-case gap closed over the tuning texts and budgets (ties: the larger mean
   pooled kept share over the tuning task cells).
If no candidate is eligible, that is said, and the fallback picks among those with no tuning cell *surely* below:
the fewest tuning cells below, then the largest worst-case gap closed.
"""

from __future__ import annotations

import statistics

from .answers import POOLED
TUNING, HELD_OUT = "tuning", "held-out"


def ppl_cells(rows: list[dict], candidates: list[str], reference: str, tuning_texts: set[str]) -> list[dict]:
    """One cell per candidate, text and budget of a sweep's ppl_rows (family, text, budget, ppl, gap_closed,
    gap_low, gap_high), against the reference family's row of the same text and budget."""
    ref = {(r["text"], r["budget"]): r for r in rows if r["family"] == reference}
    out = []
    for r in rows:
        if r["family"] not in candidates or (r["text"], r["budget"]) not in ref:
            continue
        base = ref[r["text"], r["budget"]]
        gap = r.get("gap_closed")
        below = gap < 0 if gap is not None else r["ppl"] > base["ppl"]
        high = r.get("gap_high")
        out.append({"candidate": r["family"], "kind": "ppl", "split": TUNING if r["text"] in tuning_texts else HELD_OUT,
                    "where": f"{r['text']} @ {r['budget']}", "genre": r.get("genre"), "budget": r["budget"],
                    "value": gap, "reference_value": 0.0 if gap is not None else base["ppl"],
                    "shown": (f"gap {gap:+.2f}" if gap is not None else f"no gap: PPL {r['ppl']:.3f} vs {base['ppl']:.3f}"),
                    "interval": r.get("gap_interval") or "–", "below": bool(below),
                    "surely_below": high is not None and high < 0, "pooled": False})
    return out


def task_cells(summary: list[dict], paired: list[dict], protocol: str, split: str, candidates: list[str],
               reference: str) -> list[dict]:
    """One cell per candidate, task, phrasing (each and pooled), question index (the multi-question protocols) and
    budget of one `h2o tasks` run (its summary and paired rows), against the reference policy on the same cases."""
    # a question index per row (the multi-question protocols ask several of a case; 1 elsewhere and in older runs)
    ref = {(r["task"], r["phrasing"], r.get("question", 1), r["budget"]): r for r in summary
           if r["policy"] == reference}
    tests = {(p["task"], p["phrasing"], p.get("question", 1), p["budget"], frozenset((p["policy_a"], p["policy_b"]))): p
             for p in paired}
    out = []
    for r in summary:
        key = (r["task"], r["phrasing"], r.get("question", 1), r["budget"])
        if r["policy"] not in candidates or r["kept_share"] is None or key not in ref or ref[key]["kept_share"] is None:
            continue
        base = ref[key]
        test = tests.get((*key, frozenset((r["policy"], reference))))
        surely = test is not None and test["verdict"] == f"{reference} better"
        asked = f" / question {key[2]}" if any(x.get("question", 1) > 1 for x in summary) else ""
        out.append({"candidate": r["policy"], "kind": "tasks", "split": split,
                    "where": f"{r['task']} / {protocol} / {r['phrasing']}{asked} @ {r['budget']}", "genre": None,
                    "budget": r["budget"], "value": r["kept_share"], "reference_value": base["kept_share"],
                    "shown": f"{r['policy_solved']}/{r['control']} vs {base['policy_solved']}/{base['control']}",
                    "interval": r.get("interval") or "–", "below": r["kept_share"] < base["kept_share"],
                    "surely_below": surely, "p_value": None if test is None else test["p_value"],
                    "pooled": r["phrasing"] == POOLED, "task": r["task"], "protocol": protocol})
    return out


def choose(cells: list[dict], candidates: list[str]) -> tuple[list[dict], str | None, list[str]]:
    """(one row per candidate, ranked; the chosen candidate or None; notes) under the criterion above."""
    rows = []
    for c in candidates:
        mine = [x for x in cells if x["candidate"] == c]
        tuning = [x for x in mine if x["split"] == TUNING]
        held = [x for x in mine if x["split"] == HELD_OUT]
        gaps = [x["value"] for x in tuning if x["kind"] == "ppl" and x["value"] is not None]
        held_gaps = [x["value"] for x in held if x["kind"] == "ppl" and x["value"] is not None]
        kept = [x["value"] for x in tuning if x["kind"] == "tasks" and x["pooled"]]
        below = [x for x in tuning if x["below"]]
        rows.append({"candidate": c, "tuning_cells": len(tuning), "below": len(below),
                     "surely_below": sum(x["surely_below"] for x in tuning),
                     "below_where": "; ".join(f"{x['where']} ({x['shown']})" for x in below) or "–",
                     "worst_gap": min(gaps) if gaps else None, "mean_gap": statistics.mean(gaps) if gaps else None,
                     "mean_pooled_kept": statistics.mean(kept) if kept else None,
                     "held_out_cells": len(held), "held_out_below": sum(x["below"] for x in held),
                     "held_out_surely_below": sum(x["surely_below"] for x in held),
                     "held_out_worst_gap": min(held_gaps) if held_gaps else None})
    notes = []
    if not any(r["tuning_cells"] for r in rows):
        raise ValueError("no tuning cell: the inputs hold no candidate measured beside the reference on a tuning "
                         "text or tuning task")

    def quality(r):  # larger is better; a candidate without a gap or a kept share ranks last on it
        return (r["worst_gap"] if r["worst_gap"] is not None else float("-inf"),
                r["mean_pooled_kept"] if r["mean_pooled_kept"] is not None else float("-inf"))

    strict = [r for r in rows if r["tuning_cells"] and r["below"] == 0]
    if strict:
        ranked = sorted(strict, key=quality, reverse=True)
        for r in rows:
            r["verdict"] = "eligible" if r in strict else f"not eligible: below the reference in {r['below']} tuning cell(s)"
    else:
        fallback = [r for r in rows if r["tuning_cells"] and r["surely_below"] == 0]
        notes.append("no candidate met the criterion (below the reference in no tuning cell): every one is below it "
                     "somewhere; the fallback picks, among those surely below it nowhere, the fewest cells below, "
                     "then the largest worst-case gap closed")
        ranked = sorted(fallback, key=lambda r: (-r["below"], *quality(r)), reverse=True)
        for r in rows:
            r["verdict"] = (f"fallback: below in {r['below']} tuning cell(s), surely in none" if r in fallback else
                            f"not eligible: surely below the reference in {r['surely_below']} tuning cell(s)")
    for r in rows:
        r["rank"] = ranked.index(r) + 1 if r in ranked else None
    chosen = ranked[0]["candidate"] if ranked else None
    if chosen is None:
        notes.append("no candidate is left: every one is surely below the reference in some tuning cell")
    rows.sort(key=lambda r: (r["rank"] is None, r["rank"] or 0))
    return rows, chosen, notes
