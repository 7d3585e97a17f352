"""The PPL loop and its validity guards (tiny random checkpoints), plus the embedded model's sinks."""

import math

import pytest
import torch
import torch.nn.functional as F

import h2o
from h2o.cache import CompressedLayer
from h2o.eval.ppl import PPLResult, ValidityError, check_bound, check_eviction_in_force, token_losses
from tiny import tiny_model, token_ids


def reference_losses(model, ids):
    with torch.no_grad():
        logits = model(ids).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")


@pytest.mark.parametrize("chunk", [1, 7])
def test_full_baseline_keeps_the_whole_context(chunk):
    model = tiny_model("llama")
    ids = token_ids(60, batch=2)
    result = token_losses(model, ids, "full", chunk=chunk, progress=False)
    assert result.losses.shape == (2, 59)
    torch.testing.assert_close(result.losses, reference_losses(model, ids), rtol=1e-4, atol=1e-4)
    assert result.first_eviction is None and result.max_kept == 60
    assert result.mode == ("stream" if chunk == 1 else "chunked-7")


def test_compressed_run_evicts_and_differs_from_full():
    model = tiny_model("gpt_neox")
    ids = token_ids(80)
    full = token_losses(model, ids, "full", progress=False)
    h2o_run = token_losses(model, ids, "h2o_2_4_16", buffer=4, progress=False)
    h2o.restore(model)
    assert h2o_run.first_eviction == 21  # 21 tokens seen > 16 + 4: the logits at position 21 see the cut cache
    assert h2o_run.max_kept <= 20
    torch.testing.assert_close(h2o_run.losses[:, :21], full.losses[:, :21], rtol=1e-4, atol=1e-4)
    check_eviction_in_force(full, h2o_run)  # passes: losses differ after the first eviction
    assert h2o_run.ppl(after_eviction=True) != full.ppl(after_eviction=True)
    assert math.isclose(h2o_run.ppl(), math.exp(h2o_run.losses.double().mean().item()))


def test_identical_losses_after_eviction_are_rejected():
    full = PPLResult("full", "stream", torch.ones(1, 50), None, 51, False)
    fake = PPLResult("h2o_4_8_16_mean", "stream", torch.ones(1, 50), 20, 16, False)
    with pytest.raises(ValidityError, match="eviction was not in force"):
        check_eviction_in_force(full, fake)


def test_a_cache_above_its_bound_is_rejected(monkeypatch):
    monkeypatch.setattr(CompressedLayer, "evict_if_needed", lambda self: False)
    model = tiny_model("llama")
    with pytest.raises(ValidityError, match="above budget \\+ buffer = 12"):
        token_losses(model, token_ids(40), "streaming_2_8", buffer=2, progress=False)
    h2o.restore(model)


def test_trained_context_is_reported_for_original_positions_only():
    model = tiny_model("llama", layers=1)  # max_position_embeddings = 256
    ids = token_ids(300)
    original = token_losses(model, ids, "streaming_2_30", chunk=50, progress=False)
    reindex = token_losses(model, ids, "streaming_2_30", chunk=50, positions="reindex", progress=False)
    h2o.restore(model)
    assert original.past_trained_context and "trained context of 256" in original.notes[0]
    assert not reindex.past_trained_context


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk=0), "chunk must be >= 1"),
    (dict(prefill=60), "prefill must be in"),
])
def test_bad_loop_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_losses(tiny_model("llama"), token_ids(60), "full", progress=False, **kwargs)


@pytest.fixture(scope="module")
def smollm2():
    from h2o.eval import checkpoints
    return checkpoints.load_model("smollm2-135m")


@pytest.mark.slow
def test_embedded_model_needs_its_sinks(smollm2):
    """Random tiny models have no attention sinks; the real model does (keys_values #140 lesson):
    dropping the first tokens hurts, and H2O with sinks stays close to the full cache."""
    from h2o.eval import data
    model, tokenizer = smollm2
    text, _ = data.load_document("wikitext")
    ids = data.tokenize(tokenizer, text, 640)
    runs = {p: token_losses(model, ids, p, chunk=32, buffer=16, progress=False)
            for p in ["full", "streaming_0_128", "streaming_4_124", "h2o_4_16_128"]}
    h2o.restore(model)
    start = runs["h2o_4_16_128"].first_eviction
    assert start == 160  # 160 tokens seen > 128 + 16 after the 5th chunk of 32
    ppl = {p: run.ppl(start=start) for p, run in runs.items()}
    assert ppl["streaming_4_124"] < 0.9 * ppl["streaming_0_128"], ppl
    assert ppl["h2o_4_16_128"] < 1.6 * ppl["full"], ppl


@pytest.mark.slow
def test_embedded_model_generates_text_after_eviction(smollm2):
    from h2o.eval import data
    model, tokenizer = smollm2
    text, _ = data.load_document("pg19")
    ids = data.tokenize(tokenizer, text, 400)
    for policy in ["h2o_4_32_128", "streaming_4_124"]:
        cache = h2o.make_cache(model, policy, buffer=8)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=24, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        new = out[0, ids.shape[1]:]
        assert len(new) == 24 and len(set(new.tolist())) > 5, tokenizer.decode(new)  # no immediate EOS or loop
        assert max(cache.kept_lengths()) <= 128 + 8
    h2o.restore(model)


def test_the_bound_check_holds_each_head_to_its_own_budget_under_a_shared_one():
    """Under one budget across layers a head may keep more than the uniform rule's budget + buffer (stress checks the
    cache after every forward): what is held to account is each head's own bound."""
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "global+h2o_2_4_12", buffer=1)
    with torch.no_grad():
        for t in range(0, 48, 8):
            model(token_ids(48)[:, t:t + 8], past_key_values=cache, use_cache=True)
    h2o.restore(model)
    kept = check_bound(cache, 12 + 1, "global+h2o_2_4_12")
    assert kept > 12 + 1  # above the uniform rule's bound, within its own
    cache.head_bounds = lambda: [[1] * len(lengths) for lengths in cache.head_lengths()]
    with pytest.raises(ValidityError, match="above its budget"):
        check_bound(cache, 13, "global+h2o_2_4_12")
