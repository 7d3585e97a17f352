"""Peer check against NVIDIA kvpress: the prefill-time choice of kept tokens, rule by rule, on a tiny Llama.

Runs where kvpress is installed (`tox -e kvpress`: kvpress 0.5.5, transformers 4.57.6); skipped elsewhere.
kvpress compresses a prefill of L tokens to n = compute_n_kept(L, ratio) per layer and KV head; we run the
same prompt through our cache with budget n and lazy buffer 0, and compare the kept token indices:

- StreamingLLM and K-norm: the same tokens, exactly (same definition).
- TOVA: kvpress averages the newest query's attention over all query heads of the layer (as the reference
  implementation), so every KV head keeps the same tokens; we average over each KV head's group (as
  keys_values) and choose per KV head. kvpress's choice is checked to be exactly ours with the head-averaged
  score, and ours to be the per-head top of the same observation.
- SnapKV: both score a key by the attention of the last `window` queries, pooled with kernel 5, and keep the
  window. kvpress pools only the keys before the window and counts the zero padding at the edges
  (count_include_pad=True); we pool every slot and average only real neighbours (count_include_pad=False).
  kvpress's choice is checked to be exactly our observation ranked with kvpress's pooling.
"""

import pytest
import torch
import torch.nn.functional as F

import h2o
from tiny import tiny_model, token_ids

kvpress = pytest.importorskip("kvpress", reason="kvpress is not installed here; tox -e kvpress runs the peer check")

from kvpress.utils import compute_n_kept  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from h2o.eval import runners  # noqa: E402

LENGTH, RATIO = 40, 0.5
N = compute_n_kept(LENGTH, RATIO)  # 20


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("llama")
    ids = token_ids(LENGTH)
    full = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    return model, ids, full


def kvpress_kept(model, ids, full, press) -> list[torch.Tensor]:
    """Per layer, kvpress's kept token indices [Hkv, n] (sorted), found by matching its kept keys to the full
    prefill's keys (the same computation, so bitwise equal)."""
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model(ids, past_key_values=cache, use_cache=True)
    out = []
    for layer, ref in zip(cache.layers, full.layers):
        kept, keys = layer.keys[0], ref.keys[0]  # [Hkv, n, D], [Hkv, L, D]
        match = (kept.unsqueeze(2) == keys.unsqueeze(1)).all(-1)  # [Hkv, n, L]
        assert (match.sum(-1) == 1).all(), "every kept key is exactly one prompt key"
        out.append(match.float().argmax(-1).sort(-1).values)
    return out


def our_kept(model, ids, name) -> list[torch.Tensor]:
    cache = h2o.make_cache(model, name, buffer=0)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    h2o.restore(model)
    return [layer.times[0] for layer in cache.layers]


def our_state(model, ids, name, key="score") -> list[torch.Tensor]:
    """Per layer, our policy's state of every prompt token [Hkv, L] (a budget above the prompt: nothing evicted)."""
    cache = h2o.make_cache(model, name, buffer=0)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    h2o.restore(model)
    return [layer.state[key][0] for layer in cache.layers]


def top(score: torch.Tensor, n: int) -> torch.Tensor:
    return score.topk(n, dim=-1).indices.sort(-1).values


def test_streaming_llm_keeps_the_same_tokens(setup):
    model, ids, full = setup
    theirs = kvpress_kept(model, ids, full, kvpress.StreamingLLMPress(compression_ratio=RATIO, n_sink=4))
    ours = our_kept(model, ids, f"streaming_4_{N - 4}")
    for t, o in zip(theirs, ours):
        assert torch.equal(t, o)


def test_knorm_keeps_the_same_tokens(setup):
    model, ids, full = setup
    theirs = kvpress_kept(model, ids, full, kvpress.KnormPress(compression_ratio=RATIO))
    ours = our_kept(model, ids, f"knorm_0_0_{N}")
    for t, o in zip(theirs, ours):
        assert torch.equal(t, o)


def test_tova_differs_only_by_head_averaging(setup):
    model, ids, full = setup
    theirs = kvpress_kept(model, ids, full, kvpress.TOVAPress(compression_ratio=RATIO))
    ours = our_kept(model, ids, f"tova_0_1_{N}")
    rows = our_state(model, ids, f"tova_0_1_{LENGTH + 8}")  # the newest query's row, per KV head (group mean)
    differs = False
    for t, o, row in zip(theirs, ours, rows):
        layer_mean = row[:, :-1].mean(0, keepdim=True)  # over KV heads = over all query heads (equal groups)
        as_kvpress = torch.cat([top(layer_mean, N - 1), torch.tensor([[LENGTH - 1]])], -1).expand_as(t)
        assert torch.equal(t, as_kvpress), "kvpress TOVA = our observation averaged over the layer's heads"
        assert (t == t[:1]).all(), "kvpress keeps the same tokens in every KV head"
        per_head = torch.cat([top(row[:, :-1], N - 1), torch.full((row.shape[0], 1), LENGTH - 1)], -1)
        assert torch.equal(o, per_head), "ours: the per-KV-head top of the same observation"
        differs |= not torch.equal(t, o)
    assert differs, "on this model the two definitions choose differently in some layer (else nothing is checked)"


def test_snapkv_differs_only_by_pooling(setup):
    model, ids, full = setup
    window = 8
    theirs = kvpress_kept(model, ids, full, kvpress.SnapKVPress(compression_ratio=RATIO, window_size=window))
    ours = our_kept(model, ids, f"snapkv_0_{window}_{N}_{window}")
    masses = our_state(model, ids, f"snapkv_0_{window}_{LENGTH + 8}_{window}")  # the window queries' summed mass
    for t, o, mass in zip(theirs, ours, masses):
        before = mass[:, : LENGTH - window]  # kvpress: only the keys before the window, zero padding counted
        pooled = F.avg_pool1d(before.unsqueeze(1), 5, stride=1, padding=2).squeeze(1)
        window_slots = torch.arange(LENGTH - window, LENGTH).expand(mass.shape[0], -1)
        as_kvpress = torch.cat([top(pooled, N - window), window_slots], -1)
        assert torch.equal(t, as_kvpress), "kvpress SnapKV = our observation with kvpress's pooling"
        ours_pooled = F.avg_pool1d(mass.unsqueeze(1), 5, stride=1, padding=2, count_include_pad=False).squeeze(1)
        ours_pooled[:, LENGTH - window:] = torch.inf  # the recent window is protected
        assert torch.equal(o, top(ours_pooled, N)), "ours: every slot pooled over its real neighbours"


def test_press_runner_keeps_what_kvpress_promises(setup):
    """The harness's runner: kvpress:knorm@20 keeps exactly 20 after the prefill, then one more per token fed,
    at the true positions (its logits equal a plain forward's where nothing was compressed)."""
    model, ids, full = setup
    runner = runners.open_runner(model, f"kvpress:knorm@{N}")
    with torch.no_grad():
        runner.forward(ids)
        assert runner.check() == N and runner.budget_for(LENGTH) == N
        runner.forward(token_ids(1, seed=5))
        assert runner.check() == N + 1
    runner.close()
    ratio = runners.open_runner(model, "kvpress:knorm@0.75")
    with torch.no_grad():
        ratio.forward(ids)
    assert ratio.check() == compute_n_kept(LENGTH, 0.75) == 10
    none = runners.open_runner(model, f"kvpress:knorm@{LENGTH}")  # keeps the whole prompt: the plain forward
    with torch.no_grad():
        logits = none.forward(ids)
        reference = model(ids).logits
    torch.testing.assert_close(logits, reference)


def test_decoding_press_runner_stays_bounded(setup):
    model, ids, _ = setup
    runner = runners.open_runner(model, "kvpress:decoding:knorm@16", buffer=3)  # back to 16 every 4 steps
    with torch.no_grad():
        runner.forward(ids[:, :1])
        for t in range(1, LENGTH):
            runner.forward(ids[:, t:t + 1])
            assert runner.check() <= 16 + 4
    runner.close()
    assert max(runner.kept_lengths()) < LENGTH - 1  # it compressed


def _masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Eager attention, causal, with the (KV head, token) pairs in _ALLOWED[layer] hidden from the last query."""
    groups = query.shape[1] // key.shape[1]
    total = key.shape[-2]
    allowed = torch.ones(query.shape[1], total, total, dtype=torch.bool).tril()
    allowed[:, -1] = _ALLOWED[module.layer_idx].repeat_interleave(groups, dim=0)
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    probs = ((query @ key.transpose(-1, -2)) * scaling).masked_fill(~allowed, -torch.inf).softmax(-1)
    return (probs @ value).transpose(1, 2).contiguous(), probs


_ALLOWED = {}


def test_adakv_runner_masks_what_kvpress_chose_and_frees_nothing(setup):
    """kvpress:adakv:knorm@20: kvpress's AdaKVPress keeps all 40 prompt tokens (nothing freed: KV bytes of the
    whole prompt), masks 2 heads x 20 (head, token) pairs per layer, split unevenly across heads, and the next
    token's logits equal a full forward whose last query cannot see exactly those pairs (the runner's forwards
    run on kvpress's patched sdpa even while h2o's attention is set on the model)."""
    from transformers import AttentionInterface

    model, ids, _ = setup
    h2o.make_cache(model, "h2o_4_8_16")  # h2o's attention on the model, as between runners of a mixed run
    runner = runners.open_runner(model, f"kvpress:adakv:knorm@{N}")
    nxt = token_ids(1, seed=5)
    with torch.no_grad():
        runner.forward(ids)
        assert runner.check() == LENGTH and runner.compressed() and runner.budget_for(LENGTH) == N
        heads = model.config.num_key_value_heads
        assert runner.masked() == [heads * (LENGTH - N)] * model.config.num_hidden_layers
        uneven = False
        for m in runner.attention_modules:
            batch, head, token = m.masked_key_indices
            allowed = torch.ones(heads, LENGTH + 1, dtype=torch.bool)
            allowed[head, token] = False
            _ALLOWED[m.layer_idx] = allowed
            counts = (~allowed).sum(-1)
            uneven |= bool((counts != counts[0]).any())
        assert uneven, "AdaKV split some layer's budget unevenly across heads (else this is the uniform case)"
        # the storages held (each once, whole): at least the kept keys' and values' own bytes
        assert runner.kv_bytes() >= sum(t.numel() * t.element_size() for layer in runner.cache.layers
                                        for t in (layer.keys, layer.values))
        logits = runner.forward(nxt)[:, -1]
        assert runner.check() == LENGTH + 1
    assert model.config._attn_implementation == "h2o_sdpa", "the runner gave the model back h2o's attention"
    h2o.restore(model)
    AttentionInterface.register("h2o_test_adakv_oracle", _masked_attention)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register("h2o_test_adakv_oracle", sdpa_mask)
    model.set_attn_implementation("h2o_test_adakv_oracle")
    try:
        with torch.no_grad():
            reference = model(torch.cat([ids, nxt], 1)).logits[:, -1]
    finally:
        model.set_attn_implementation("sdpa")
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)


def test_bad_press_names_are_refused():
    for name, message in [("kvpress:nosuch@0.5", "kvpress has no press 'nosuch'"),
                          ("kvpress:snapkv@1.5", "must lie in"), ("kvpress:decoding:knorm", "target size"),
                          ("kvpress:adakv:nosuch@20", "kvpress has no press 'nosuch'")]:
        with pytest.raises(ValueError, match=message):
            runners.parse_press(name)
