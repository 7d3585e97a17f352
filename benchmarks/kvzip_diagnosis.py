"""Why KVzip keeps or loses a needle, measured: the replay's reconstruction, the needle's score rank, the answer held.

    python benchmarks/kvzip_diagnosis.py --model gemma3-270m --phrasing completion --lengths 1000 4000
    python benchmarks/kvzip_diagnosis.py --model smollm2-135m --lengths 1000 4000

For each passkey case (`h2o tasks`' own generator, its haystacks through the data layer), the whole prompt but its
last token is fed once into a `kvzip_<sinks>_<recent>_<budget>` cache (question-aware protocol), the budget a share
of the prompt. Measured in that one forward and its replay:

- replay accuracy: the teacher-forced next-token accuracy of the replayed context (how well the model reconstructs
  it: KVzip's score is the attention of that reconstruction, so a model that cannot reconstruct cannot score);
- per compressed layer and KV head, the rank of the answer's tokens (the passkey's digits inside the needle) among
  the context's tokens by KVzip's score, before eviction (0 = the best-scored token), and the share of them a
  per-head top-k at the budget keeps (what `kvzip_...` keeps), and the share one top-k over every layer and head keeps
  (what `global+kvzip_...` keeps, the sinks and recent window kept in every head first);
- the same for `--compare` (by default H2O's accumulated attention, `h2o_..._mean`, whose scores come from the
  prompt's own queries, the question's included);
- the greedy answer under each of `--answers` at the same budget (`h2o tasks`' `respond`, question-aware), among them
  `needle`: an oracle registered by this script that keeps the needle statements' tokens first (it is told where they
  are), then ranks by TOVA's peak attention. If the oracle answers where KVzip does not, the model can be served at
  that budget and KVzip's scores, not the memory, lose the answer.

Prints a line per case and a summary; writes CSV and JSON to --out.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass

import torch

import h2o
from h2o.eval import checkpoints, data, report, retrieval
from h2o.eval.answers import respond
from h2o.eval.runners import provide_tokenizer
from h2o.policies.base import Sized

_NEEDLE = {"times": torch.zeros(0, dtype=torch.long)}  # the current case's needle token positions


@h2o.register_policy
@dataclass(frozen=True)
class NeedleOracle(Sized):
    """Not a rule: it is told the needle statements' positions (`_NEEDLE`) and keeps them first, then by the peak
    attention the newest query gave (TOVA's). What any rule could keep at this budget, at best."""
    NAME, GRAMMAR, EXAMPLE = "needle", "needle_<sinks>_<recent>_<budget>", "needle_4_32_256"
    observes = frozenset({"last"})
    state = ("peak",)

    def update(self, state, obs, seen):
        torch.maximum(state["peak"], obs.last, out=state["peak"])

    def rank(self, state, times, seen, **slots):
        return state["peak"] + 10.0 * torch.isin(times, _NEEDLE["times"].to(times.device)).float()


def needle_positions(tokenizer, case, prefix_tokens: int) -> list[int]:
    """Positions in the prompt of the tokens of every needle statement of the case."""
    enc = tokenizer(case.context, add_special_tokens=False, return_offsets_mapping=True)
    spans = [(m.start(), m.end()) for needle in case.needles for m in re.finditer(re.escape(needle), case.context)]
    return [prefix_tokens + i for i, (a, b) in enumerate(enc["offset_mapping"]) if any(a < e and b > s for s, e in spans)]


def _capture(cache, model):
    """Hooks that record each replay forward's (input ids, last hidden state) and every compressed layer's
    (scores, arrival times) just before the cache evicts."""
    replays, before = [], []

    def on_forward(module, args, kwargs, output):
        if getattr(cache, "replaying", False):
            replays.append((kwargs["input_ids"].detach(), output.last_hidden_state.detach()))

    handle = model.base_model.register_forward_hook(on_forward, with_kwargs=True)
    release = cache.release

    def snapshot_then_release():
        before.append([(layer.scores.clone(), layer.times.clone()) for layer in cache.compressed_layers()])
        release()

    cache.release = snapshot_then_release
    return replays, before, handle


def replay_accuracy(model, replays, chunk_lengths) -> float:
    """Teacher-forced next-token accuracy over every replayed context token."""
    right = total = 0
    for (ids, hidden), c in zip(replays, chunk_lengths):
        r = ids.shape[1]
        logits = model.get_output_embeddings()(hidden[:, r - c - 1:r - 1])
        right += int((logits.argmax(-1) == ids[:, r - c:]).sum())
        total += c
    return right / max(1, total)


def ranks(scores, times, answer, sinks, recent, budget, seen):
    """Per layer and head: the answer tokens' mean rank among the evictable context tokens (0 = best), and the share
    a per-head top-k keeps; and the share one pooled top-k over all (layer, head) keeps."""
    per_head, pooled = [], []
    protected = lambda t: (t < sinks) | (t >= seen - recent)  # noqa: E731
    for li, (s, t) in enumerate(zip(scores, times)):
        for h in range(s.shape[1]):
            sc, tm = s[0, h].float(), t[0, h]
            free = ~protected(tm)
            order = torch.argsort(sc.masked_fill(~free, -torch.inf), descending=True)
            rank_of = torch.empty_like(order)
            rank_of[order] = torch.arange(order.numel())
            is_answer = torch.isin(tm, answer)
            a_free = is_answer & free
            kept_free = budget - sinks - recent
            kept = (is_answer & ~free).sum() + (a_free & (rank_of < kept_free)).sum()
            per_head.append({"layer": li, "head": h, "median_score": float(sc[free].median()),
                             "max_score": float(sc[free].max()),
                             "answer_score": float(sc[a_free].mean()) if a_free.any() else float("nan"),
                             "answer_rank": float(rank_of[a_free].float().mean()) if a_free.any() else float("nan"),
                             "free_tokens": int(free.sum()),
                             "answer_kept": float(kept) / max(1, int(is_answer.sum()))})
            pooled.append((sc, tm, free, is_answer))
    total_free = sum(budget - sinks - recent for _ in pooled)
    allsc = torch.cat([sc.masked_fill(~free, -torch.inf) for sc, _, free, _ in pooled])
    threshold = torch.topk(allsc, total_free).values[-1]
    held = sum(int((ans & ((sc >= threshold) & free | ~free)).sum()) for sc, _, free, ans in pooled)
    n = sum(int(ans.sum()) for *_, ans in pooled)
    return per_head, held / max(1, n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=checkpoints.EMBEDDED)
    p.add_argument("--lengths", type=int, nargs="+", default=[1000])
    p.add_argument("--depths", type=float, nargs="+", default=[0.2, 0.5, 0.8])
    p.add_argument("--cases", type=int, default=1)
    p.add_argument("--ratio", type=float, default=0.2, help="budget per compressed KV head, a share of the prompt")
    p.add_argument("--phrasing", default=None, help="h2o tasks' phrasing (default: the task's)")
    p.add_argument("--compare", default="h2o_mean", help="a second rule family whose ranks are shown beside")
    p.add_argument("--answers", nargs="*", default=["full", "streaming", "tova", "kvzip", "global+kvzip", "needle"],
                   help="rule families answered at the same budget (needle: the oracle); none: ranks only")
    p.add_argument("--pg19-books", nargs="+", default=["10146"])
    p.add_argument("--data-dir", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="kvzip_diagnosis")
    a = p.parse_args(argv)
    out = report.prepare_output_dir(a.out)
    for family in a.answers:
        if family != "full":
            h2o.policies.at_budget(family, 256)  # a bad family is refused before the model loads
    model, tokenizer = checkpoints.load_model(a.model, "cpu", "float32", "sdpa", None)
    provide_tokenizer(model, tokenizer)
    haystacks = {f"pg19/{b}": data.load_document("pg19", b, a.data_dir)[0] for b in a.pg19_books}
    cases = retrieval.generate_cases("passkey", tokenizer, haystacks, a.lengths, a.depths, a.cases, a.seed,
                                     phrasing=a.phrasing)
    rows, heads = [], []
    for case in cases:
        prefix, context, suffix = retrieval.case_token_ids(tokenizer, case)
        ids = prefix + context + suffix
        prompt = torch.tensor([ids[:-1]])
        n = prompt.shape[1]
        budget = int(round(a.ratio * n))
        sinks, recent = 4, budget // 8
        answer = torch.tensor(retrieval.answer_positions(tokenizer, case, len(prefix)) or [])
        row = {"model": a.model, "length": case.length, "depth": case.depth, "index": case.index,
               "prompt_tokens": n, "budget": budget, "answer_tokens": len(answer),
               "answer_depth": float(answer.float().mean() / n) if len(answer) else float("nan")}
        for label, name in (("kvzip", f"kvzip_{sinks}_{recent}_{budget}"),
                            # the compared rule at a budget above the prompt: its scores before any eviction
                            (a.compare, h2o.policies.at_budget(a.compare.split("_")[0], n + 1,
                                                                a.compare.split("_")[1] if "_" in a.compare else None,
                                                                recent=recent).name)):
            cache = h2o.make_cache(model, name, tokenizer=tokenizer)
            if label == "kvzip":
                replays, before, handle = _capture(cache, model)
            with torch.no_grad():
                model(prompt, past_key_values=cache, use_cache=True)
            if label == "kvzip":
                handle.remove()
                chunks = [min(cache.replayer.chunk, n - s) for s in range(0, n, cache.replayer.chunk)]
                row["replay_accuracy"] = replay_accuracy(model, replays, chunks)
                scored = before[0]
            else:
                scored = [(layer.scores.clone(), layer.times.clone()) for layer in cache.compressed_layers()]
                assert all(t.shape[-1] == n for _, t in scored), "the compared rule evicted during the prompt"
            h2o.restore(model)
            per_head, pooled = ranks([s for s, _ in scored], [t for _, t in scored], answer, sinks, recent, budget, n)
            for hrow in per_head:
                heads.append({**{k: row[k] for k in ("model", "length", "depth", "index")}, "rule": label, **hrow})
            row[f"{label}_kept_per_head"] = sum(h["answer_kept"] for h in per_head) / len(per_head)
            row[f"{label}_kept_pooled"] = pooled
            row[f"{label}_best_head_kept"] = max(h["answer_kept"] for h in per_head)
        _NEEDLE["times"] = torch.tensor(needle_positions(tokenizer, case, len(prefix)))
        for family in a.answers:
            name = "full" if family == "full" else h2o.policies.at_budget(family, budget, recent=recent).name
            answer = respond(model, tokenizer, case, name, "question-aware")
            row[f"solved:{family}"] = int(answer.solved)
            row[f"held:{family}"] = (sum(answer.answer_held) / len(answer.answer_held)
                                     if answer.answer_held else float("nan"))
            row[f"kv_mib:{family}"] = answer.kv_bytes / report.MIB
        rows.append(row)
        print("   answers: " + ", ".join(f"{f} {row[f'solved:{f}']} (held {row[f'held:{f}']:.2f})" for f in a.answers),
              file=sys.stderr)
        print(f"{a.model} L={case.length} depth={case.depth}: replay accuracy {row['replay_accuracy']:.3f}; answer "
              f"kept per head kvzip {row['kvzip_kept_per_head']:.2f} (best head {row['kvzip_best_head_kept']:.2f}), "
              f"pooled {row['kvzip_kept_pooled']:.2f}; {a.compare} per head {row[f'{a.compare}_kept_per_head']:.2f}, "
              f"pooled {row[f'{a.compare}_kept_pooled']:.2f}", file=sys.stderr)
        mine = [h for h in heads if (h["length"], h["depth"], h["index"]) == (case.length, case.depth, case.index)]
        for rule in ("kvzip", a.compare):
            layers = sorted({h["layer"] for h in mine})
            cells = []
            for layer in layers:
                hs = [h for h in mine if h["rule"] == rule and h["layer"] == layer]
                cells.append(f"{layer}:{sum(h['answer_kept'] for h in hs) / len(hs):.2f}")
            print(f"   answer kept per layer (mean over heads), {rule}: {' '.join(cells)}", file=sys.stderr)
            scores = [f"{h['layer']}:{h['head']} {h['answer_score']:.3f}/{h['median_score']:.3f}/{h['max_score']:.3f}"
                      for h in mine if h["rule"] == rule]
            print(f"   {rule} score of the answer's tokens / median / max of the evictable tokens, per layer:head: "
                  + "; ".join(scores), file=sys.stderr)
    print(f"{a.model}, {len(rows)} passkey cases, budget {a.ratio:.0%} of the prompt per compressed KV head")
    print(f"replay accuracy (teacher-forced, mean): {sum(r['replay_accuracy'] for r in rows) / len(rows):.3f}")
    print("| rule | answer kept: per-head top-k | one top-k over all heads | solved | answer held | KV MiB |")
    print("|---|---|---|---|---|---|")
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    for family in sorted(set(a.answers) | {"kvzip", a.compare}, key=lambda f: (f not in a.answers, a.answers.index(f) if f in a.answers else 0)):
        ranked = family in ("kvzip", a.compare)
        cells = [f"{mean(f'{family}_kept_per_head'):.2f}" if ranked else "–",
                 f"{mean(f'{family}_kept_pooled'):.2f}" if ranked else "–"]
        if family in a.answers:
            cells += [f"{sum(r[f'solved:{family}'] for r in rows)}/{len(rows)}", f"{mean(f'held:{family}'):.2f}",
                      f"{mean(f'kv_mib:{family}'):.2f}"]
        else:
            cells += ["–", "–", "–"]
        print(f"| {family} | " + " | ".join(cells) + " |")
    report.write_csv(out / "kvzip_diagnosis.csv", rows)
    report.write_csv(out / "kvzip_diagnosis_heads.csv", heads)
    report.write_json(out / "kvzip_diagnosis.json", {"rows": rows, "heads": heads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
