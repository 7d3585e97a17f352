"""The README's "Use it" code, run exactly as printed, in one namespace, on the embedded model (SmolLM2-135M):
the first block (load, compress while generating, read what is kept, restore) and the fork block (compress once,
ask many). The user-policy block is run by tests/test_user_policy.py."""

import re
from pathlib import Path

import torch

import h2o

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readmes_use_it_and_fork_blocks_run_as_printed():
    blocks = python_blocks()
    use_it = next(b for b in blocks if "h2o.load_model(" in b)
    forks = next(b for b in blocks if "cache.fork()" in b)
    namespace: dict = {}
    exec(compile(use_it, "README.md: Use it", "exec"), namespace)
    cache, model = namespace["cache"], namespace["model"]
    assert namespace["ids"].shape[1] < namespace["out"].shape[1] <= namespace["ids"].shape[1] + 20
    # what the README says the kept-tokens line reads: each layer between the budget and budget + buffer
    assert all(256 <= n <= 256 + 64 for n in cache.kept_lengths()) and cache.evicted()
    assert cache.kv_bytes() > 0
    assert getattr(model.config, "_attn_implementation", None) == "sdpa"  # restored
    exec(compile(forks, "README.md: compress once, ask many", "exec"), namespace)
    cache, questions = namespace["cache"], namespace["questions"]
    assert cache.evicted() and cache.get_seq_length() == namespace["context_ids"].shape[1]  # never changed by a fork
    asked = namespace["context_ids"].shape[1] + questions[-1].shape[1]
    assert asked < namespace["out"].shape[1] <= asked + 8
    with torch.no_grad():  # the cache is refused after restore: nothing written
        try:
            model(questions[0], past_key_values=cache, use_cache=True)
        except h2o.UnobservedError:
            pass
        else:
            raise AssertionError("a cache used after h2o.restore must be refused")
