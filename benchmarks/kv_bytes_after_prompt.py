"""The bytes a cache keeps alive after one prompt, per policy and prompt length, on the embedded model (or --model).

    python benchmarks/kv_bytes_after_prompt.py                       # the issue-38 table: 4 policies x 600/727/1100
    python benchmarks/kv_bytes_after_prompt.py --policies h2o_4_32_256 kvzip_4_32_256 --lengths 2000

Each prompt (WikiText-2 test text, through the data layer) is one forward into a new cache; then `cache.kv_bytes()`
(every storage the cache holds, each once, whole) and the key/value storages alone are read, and the same after one
decode step. Also checked and printed: the kept tokens per layer, and that no storage reachable from the cache is
left out of the count. Prints a table, writes CSV and JSON to --out.
"""

from __future__ import annotations

import argparse
import sys

import torch

import h2o
from h2o.cache import reachable_storages
from h2o.eval import checkpoints, data, report
from h2o.eval.head_score_cache import scores_for
from h2o.policies.allocation import Allocated

POLICIES = ["h2o_4_32_256", "kvzip_4_32_256", "global+kvzip_4_32_256", "retrieval_0.1_4+h2o_4_32_256_mean"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=checkpoints.EMBEDDED)
    p.add_argument("--policies", nargs="+", default=POLICIES)
    p.add_argument("--lengths", type=int, nargs="+", default=[600, 727, 1100])
    p.add_argument("--buffer", type=int, default=64)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="kv_bytes_after_prompt")
    a = p.parse_args(argv)
    for name in a.policies:
        h2o.parse(name)  # a bad name is refused before the model loads
    out = report.prepare_output_dir(a.out)  # writable, before the model loads
    model, tokenizer = checkpoints.load_model(a.model, "cpu", "float32", "sdpa", None)
    text = data.load_text("wikitext", data_dir=a.data_dir)
    ids_all, source = data.token_ids(tokenizer, model.config.vocab_size, text, max(a.lengths) + 1,
                                     data.adds_bos(tokenizer))
    print(f"prompts: the {source}", file=sys.stderr)
    scores = None
    rows = []
    for name in a.policies:
        if isinstance(h2o.parse(name), Allocated) and scores is None:
            scores = scores_for(model, tokenizer, a.model, a.data_dir)
        for n in a.lengths:
            cache = h2o.make_cache(model, name, buffer=a.buffer, head_scores=scores, tokenizer=tokenizer)
            with torch.no_grad():
                model(ids_all[:, :n], past_key_values=cache, use_cache=True)
                after_prompt, kv_only = cache.kv_bytes(), cache.kv_bytes(bookkeeping=False)
                uncounted = sum(b for b in reachable_storages(cache).values()) - after_prompt
                kept = max(cache.kept_lengths())
                tokens = sum(map(sum, cache.head_lengths()))  # every KV head's kept tokens, in all
                model(ids_all[:, n:n + 1], past_key_values=cache, use_cache=True)
                after_step = cache.kv_bytes()
            h2o.restore(model)
            rows.append({"policy": name, "prompt_tokens": n, "kv_mib": after_prompt / report.MIB,
                         "kv_only_mib": kv_only / report.MIB, "kv_mib_after_step": after_step / report.MIB,
                         "kept_longest_layer": kept, "tokens_kept_all_heads": tokens,
                         "bytes_reachable_not_counted": uncounted})
            print(f"{name:40s} {n:5d} tokens: {after_prompt / report.MIB:7.2f} MiB held ({kv_only / report.MIB:.2f} "
                  f"keys/values), {after_step / report.MIB:.2f} after a step; {tokens} tokens kept in all heads, the "
                  f"longest layer {kept}; "
                  f"{uncounted} B reachable and not counted", file=sys.stderr)
    report.write_csv(out / "kv_bytes_after_prompt.csv", rows)
    report.write_json(out / "kv_bytes_after_prompt.json", {"rows": rows})
    lengths = a.lengths
    print("MiB held after the prompt (tokens kept in all KV heads)")
    print("| policy | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---|" + "---|" * len(lengths))
    for name in a.policies:
        cells = [f"{r['kv_mib']:.2f} ({r['tokens_kept_all_heads']})" for n in lengths for r in rows if r["policy"] == name and r["prompt_tokens"] == n]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
