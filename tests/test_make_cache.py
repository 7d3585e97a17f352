"""make_cache / restore: what they set on the model, and every bad input rejected before compute."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import h2o
from tiny import tiny_model, token_ids


def test_make_cache_switches_attention_and_restore_undoes_it():
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "h2o_4_32_256")
    assert model.config._attn_implementation == "h2o_sdpa"
    assert cache.policy == h2o.H2O(4, 32, 256, h2o.DEFAULT_SCORE)
    h2o.make_cache(model, "streaming_4_252")  # a second cache does not stack wrappers
    assert model.config._attn_implementation == "h2o_sdpa"
    h2o.restore(model)
    assert model.config._attn_implementation == "sdpa"
    h2o.restore(model)  # idempotent
    assert model.config._attn_implementation == "sdpa"
    eager = tiny_model("gpt_neox", attn="eager")
    h2o.make_cache(eager, "streaming_2_10")
    assert eager.config._attn_implementation == "h2o_eager"
    h2o.restore(eager)
    assert eager.config._attn_implementation == "eager"


def test_cache_layers_hold_exactly_the_kept_tokens():
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "streaming_2_6", buffer=4)
    with torch.no_grad():
        model(token_ids(30), past_key_values=cache, use_cache=True)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [8, 8]
    assert [layer.values.shape[-2] for layer in cache.layers] == [8, 8]
    assert cache.get_seq_length() == 30
    assert cache.layers[0].times[0, 0].tolist() == [0, 1, 24, 25, 26, 27, 28, 29]
    # preallocated: every per-slot tensor holds budget + buffer + 1 slots (the kept 8, the lazy buffer, one
    # decode token), written in place from then on
    capacity = 8 + 4 + 1
    assert [layer.capacity for layer in cache.layers] == [capacity, capacity]
    per_slot = 2 * 1 * 2 * 16 * 4 + 1 * 2 * 8 + 1  # k+v fp32, times int64, valid bool
    assert cache.kv_bytes() == 2 * (capacity * per_slot + 8)  # + pads int64
    storage = cache.layers[0].keys.untyped_storage().data_ptr()
    with torch.no_grad():
        for t in range(6):  # 8 -> 12 kept, 13 evicts back to 8, then 9: no new buffer
            model(token_ids(1, seed=t), past_key_values=cache, use_cache=True)
            assert cache.layers[0].keys.untyped_storage().data_ptr() == storage
    assert cache.kept_lengths() == [9, 9] and cache.kv_bytes() == 2 * (capacity * per_slot + 8)


def test_score_option_selects_rule():
    model = tiny_model("llama")
    assert h2o.make_cache(model, "h2o_4_32_256", score="sum").policy.score == "sum"
    assert h2o.make_cache(model, "h2o_4_32_256_sum").policy.score == "sum"
    h2o.restore(model)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()


@pytest.mark.parametrize("kwargs, message", [
    (dict(policy="h2o_40_300_256"), "exceeds the budget"),
    (dict(policy="h2o_0_0_0"), "budget must be > 0"),
    (dict(policy="streaming_4_-1"), "unknown policy"),
    (dict(policy="snapkv_256"), "unknown policy"),
    (dict(policy="h2o_4_32_256", positions="absolute"), "positions must be one of"),
    (dict(policy="h2o_4_32_256", buffer=-1), "buffer must be an int >= 0"),
    (dict(policy="h2o_4_32_256", score="max"), "unknown H2O score rule"),
])
def test_bad_arguments_fail_before_touching_the_model(kwargs, message):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=message):
        h2o.make_cache(model, **kwargs)
    assert model.config._attn_implementation == "sdpa"


def test_unsupported_model_family():
    with pytest.raises(ValueError, match="model family 'gpt2' is not supported"):
        h2o.make_cache(_gpt2(), "streaming_4_60")


def test_reindex_needs_rotary_embeddings():
    with pytest.raises(ValueError, match="needs a model with rotary position embeddings; 'gpt2' has none"):
        h2o.make_cache(_gpt2(), "streaming_4_60", positions="reindex")


def test_attention_without_scores_is_refused():
    model = tiny_model("llama")
    model.config._attn_implementation = "flash_attention_2"  # what a CUDA user may have loaded
    with pytest.raises(ValueError, match="cannot give attention scores"):
        h2o.make_cache(model, "h2o_4_32_256")
    assert h2o.make_cache(model, "full").policy == h2o.Full()  # the full cache needs nothing from attention
