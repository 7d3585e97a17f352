"""What a fork of a compressed context costs (`CompressedCache.fork`), against compressing it, on the embedded model.

    python benchmarks/fork_cost.py                               # 2000-token context, budget 20%, 5 policies
    python benchmarks/fork_cost.py --context 4000 --ratio 0.1 --policies h2o_mean kvzip

Per policy: one forward of the context (PG-19 text, through the data layer) into a new cache, KVzip's replay
included (the compression); then `--forks` forks of it, each timed; then one answer from a fork (a question of
`--question` tokens, then `--new-tokens` greedy steps) and a check that the compressed context is unchanged by it
(every tensor it holds, bit for bit). Reported: the compression's time, the fork's (min over the forks) and their
ratio, the answer's time, and the bytes: held by the compressed context, by a fork (as forked, before its answer),
and by both together (storages they share counted once). Timings: this machine's, in one process, the policies one after another; compare the
ratios. Prints a table, writes CSV and JSON to --out.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import h2o
from h2o.cache import storage_bytes
from h2o.eval import checkpoints, data, report
from h2o.eval.head_score_cache import scores_for
from h2o.policies.allocation import Allocated

POLICIES = ["full", "h2o_mean", "kvzip", "global+kvzip", "recommended"]


def policy_at(family: str, budget: int) -> str:
    """A family at a budget (`h2o.at_budget`), or a full name as given."""
    try:
        return h2o.at_budget(family, budget).name
    except (ValueError, KeyError):
        h2o.parse(family)
        return family


def held(cache) -> list[torch.Tensor]:
    return [t for _, t in cache.held_tensors()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=checkpoints.EMBEDDED)
    p.add_argument("--policies", nargs="+", default=POLICIES, help="families (at --ratio of the context) or names")
    p.add_argument("--context", type=int, default=2000, help="context tokens")
    p.add_argument("--ratio", type=float, default=0.2, help="budget per KV head, as a share of the context")
    p.add_argument("--question", type=int, default=24, help="question tokens (the text that follows the context)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--forks", type=int, default=5)
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--book", default="10146", help="the PG-19 book the context is read from")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="fork_cost")
    a = p.parse_args(argv)
    if not 0 < a.ratio <= 1 or a.context < 16 or a.forks < 1 or a.question < 1 or a.new_tokens < 1:
        p.error("need 0 < --ratio <= 1, --context >= 16, and --forks, --question, --new-tokens >= 1")
    budget = max(8, int(a.ratio * a.context))
    names = [policy_at(f, budget) for f in a.policies]  # a bad name is refused before the model loads
    out = report.prepare_output_dir(a.out)  # writable, before the model loads
    model, tokenizer = checkpoints.load_model(a.model, "cpu", "float32", "sdpa", None)
    text = data.load_text("pg19", book=a.book, data_dir=a.data_dir)
    ids, source = data.token_ids(tokenizer, model.config.vocab_size, text, a.context + a.question,
                                 data.adds_bos(tokenizer))
    print(f"context: the {source}; budget {budget} tokens per KV head", file=sys.stderr)
    scores = None
    rows = []
    for name in names:
        if isinstance(h2o.parse(name), Allocated) and scores is None:
            scores = scores_for(model, tokenizer, a.model, a.data_dir)
        cache = h2o.make_cache(model, name, buffer=a.buffer, head_scores=scores, tokenizer=tokenizer)
        try:
            with torch.no_grad():
                start = time.perf_counter()
                model(ids[:, :a.context], past_key_values=cache, use_cache=True)
                compress_s = time.perf_counter() - start
                before = [t.clone() for t in held(cache)]
                fork_s = []
                for _ in range(a.forks):
                    start = time.perf_counter()
                    fork = cache.fork()
                    fork_s.append(time.perf_counter() - start)
                both, fork_bytes = storage_bytes(held(cache) + held(fork)), fork.kv_bytes()
                start = time.perf_counter()
                model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=fork,
                               max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False)
                answer_s = time.perf_counter() - start
                unchanged = all(torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
                                for x, y in zip(before, held(cache)))
        finally:
            h2o.restore(model)
        if not unchanged:
            raise SystemExit(f"{name}: the answer from a fork changed the compressed context")
        row = {"policy": name, "context_tokens": a.context, "budget": budget, "compress_s": compress_s,
               "fork_s": min(fork_s), "fork_over_compress": min(fork_s) / compress_s, "answer_s": answer_s,
               "context_mib": cache.kv_bytes() / report.MIB, "fork_mib": fork_bytes / report.MIB,
               "both_mib": both / report.MIB, "context_unchanged": unchanged}
        rows.append(row)
        print(f"{name:36s} compress {compress_s:7.2f} s, fork {min(fork_s) * 1e3:8.2f} ms "
              f"({row['fork_over_compress']:.2e} of it), answer {answer_s:6.2f} s; {row['context_mib']:.2f} MiB held, "
              f"a fork {row['fork_mib']:.2f}, both {row['both_mib']:.2f}", file=sys.stderr)
    report.write_csv(out / "fork_cost.csv", rows)
    report.write_json(out / "fork_cost.json", {"rows": rows})
    print(f"| policy ({a.context}-token context, budget {budget}) | compress (s) | fork (ms) | fork / compress | "
          "answer (s) | context MiB | fork MiB | both MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['compress_s']:.2f} | {r['fork_s'] * 1e3:.2f} | {r['fork_over_compress']:.1e} | "
              f"{r['answer_s']:.2f} | {r['context_mib']:.2f} | {r['fork_mib']:.2f} | {r['both_mib']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
