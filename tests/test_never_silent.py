"""A compressed cache never runs without its bound: every route that would skip eviction raises, naming the fix."""

import copy

import pytest
import torch

import h2o
from h2o.cache import UnobservedError
from tiny import tiny_model, token_ids


def test_a_cache_used_after_restore_raises():
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "h2o_4_8_16", buffer=0)
    h2o.restore(model)
    with pytest.raises(UnobservedError, match="h2o.restore was called"):
        model.generate(token_ids(30), past_key_values=cache, max_new_tokens=20, do_sample=False)


def test_a_cache_used_with_another_model_raises():
    model, other = tiny_model("llama"), tiny_model("llama", seed=1)
    cache = h2o.make_cache(model, "streaming_2_6", buffer=0)
    with pytest.raises(UnobservedError, match="used with another model"):
        other.generate(token_ids(20), past_key_values=cache, max_new_tokens=5, do_sample=False)
    h2o.restore(model)


def test_a_cache_after_switching_the_attention_implementation_raises():
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "tova_2_2_8", buffer=0)
    model.set_attn_implementation("eager")
    with pytest.raises(UnobservedError, match="attention implementation was switched"):
        model.generate(token_ids(20), past_key_values=cache, max_new_tokens=5, do_sample=False)


def test_a_deep_copy_of_a_switched_model_gets_make_cache_and_restore_right():
    model = tiny_model("llama")
    h2o.make_cache(model, "h2o_2_2_8")
    twin = copy.deepcopy(model)
    cache = h2o.make_cache(twin, "h2o_2_2_8", buffer=0)  # not "h2o_sdpa cannot give attention scores"
    with torch.no_grad():
        twin(token_ids(20), past_key_values=cache, use_cache=True)
    assert cache.kept_lengths() == [8, 8]
    h2o.restore(twin)
    assert twin.config._attn_implementation == "sdpa"
    h2o.restore(model)
    assert model.config._attn_implementation == "sdpa"


def test_reindex_refuses_rope_whose_frequencies_change_with_length():
    model = tiny_model("llama")
    model.model.rotary_emb.rope_type = "longrope"
    with pytest.raises(ValueError, match="'longrope' RoPE changes them"):
        h2o.make_cache(model, "streaming_2_6", positions="reindex")
    assert model.config._attn_implementation == "sdpa"
