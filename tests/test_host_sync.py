"""No host sync on the decode hot path: during decode steps, h2o's own code reads nothing back from a tensor.

On a GPU every value read back (`bool(t)`, `t.item()`, `t.tolist()`, `int(t)`, a data-dependent shape)
stalls the host until the device catches up, in every layer of every step. On CPU nothing stalls, so the
test counts the reads instead: the Tensor methods that sync on CUDA are patched to record every call
whose caller is a file of the `h2o` library (transformers' own reads are not ours to count). The gpu
suite (`benchmarks/test_sync.py`) runs the same decode under CUDA's sync-debug mode.
"""

import sys
from pathlib import Path

import pytest
import torch

import h2o
from tiny import TOKENIZER, tiny_model, token_ids, surrogate_kw

LIBRARY = Path(h2o.__file__).parent
READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")
RULES = [cls.sized(2, 2, 8).name for cls in h2o.policies.registered().values() if cls.evicts]


class ReadCounter:
    """Records "method in file:function" for each sync-prone Tensor method called from h2o's library code."""

    def __init__(self, monkeypatch):
        self.reads, self.active = [], False
        for name in READS:
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, real))

    def _wrap(self, name, real):
        def counted(tensor, *args, **kwargs):
            if self.active:
                caller = sys._getframe(1)
                path = Path(caller.f_code.co_filename)
                if LIBRARY in path.parents and "eval" not in path.relative_to(LIBRARY).parts:
                    self.reads.append(f"{name} in {path.name}:{caller.f_code.co_name}")
            return real(tensor, *args, **kwargs)
        return counted


def decode(model, cache, steps, counter, ids=None, mask=None):
    """Prefill (not counted), then `steps` one-token decode steps (counted); returns the mask grown with them."""
    ids = token_ids(12) if ids is None else ids
    with torch.no_grad():
        out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            counter.active = True
            out = model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
            counter.active = False
            token = out.logits[:, -1:].argmax(-1)
    return mask


@pytest.mark.parametrize("positions, dtype", [("original", torch.float32), ("reindex", torch.float32),
                                              ("reindex", torch.bfloat16)])
@pytest.mark.parametrize("policy", RULES)
def test_decode_steps_read_nothing_back(monkeypatch, policy, positions, dtype):
    model = tiny_model("llama").to(dtype)
    cache = h2o.make_cache(model, policy, **surrogate_kw(model, policy), positions=positions, buffer=2, tokenizer=TOKENIZER)
    counter = ReadCounter(monkeypatch)
    decode(model, cache, 9, counter)  # buffer 2: three evictions among the counted steps
    h2o.restore(model)
    assert cache.layers[0].seen == 21 and max(cache.kept_lengths()) <= 8 + 2
    assert counter.reads == [], f"{policy}: host reads on the decode path: {counter.reads}"


def test_generate_style_mask_reads_nothing_back(monkeypatch):
    """generate passes an all-ones attention mask at every step: still no read of ours."""
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "h2o_2_2_8", buffer=2, tokenizer=TOKENIZER)
    counter = ReadCounter(monkeypatch)
    decode(model, cache, 9, counter, mask=torch.ones(1, 12, dtype=torch.long))
    h2o.restore(model)
    assert counter.reads == []


def test_padded_batch_reads_only_when_it_evicts(monkeypatch):
    """With left padding, rows keep different counts, so an eviction reads the largest (one read per
    eviction, every `buffer` steps); the steps in between read nothing."""
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "h2o_2_2_8", buffer=8, tokenizer=TOKENIZER)
    counter = ReadCounter(monkeypatch)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    mask = decode(model, cache, 4, counter, ids=token_ids(12, batch=2), mask=mask)  # 12 + 4 <= 8 + 8: no eviction
    assert counter.reads == []
    decode_more = 3  # 16 + 1 > 8 + 8: one eviction among these steps
    with torch.no_grad():
        token = token_ids(1, batch=2)
        for _ in range(decode_more):
            mask = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
            counter.active = True
            model(token, attention_mask=mask, past_key_values=cache, use_cache=True)
            counter.active = False
    h2o.restore(model)
    layers = model.config.num_hidden_layers
    assert cache.kept_lengths() == [16] * layers  # row 0 cut to 8 + 2 steps; row 1 (9 real + 7) kept 16
    assert counter.reads == ["__int__ in base.py:keep_indices", "__bool__ in compressed_layer.py:_keep"] * layers
