"""KVzip (`kvzip_<sinks>_<recent>_<budget>[+<rule>]`, `h2o.replay`): the context scored by replaying it, chunk by
chunk, each key by the largest renormalised attention a replay query of its group gives it; the replay's keys and
values never stay; every forward of several tokens is held until its replay has scored it."""

from copy import deepcopy

import pytest
import torch
from transformers import DynamicCache

import h2o
from h2o.replay import Replay
from tiny import TOKENIZER, tiny_model, token_ids

T, SINKS, CHUNK = 30, 2, 12


def naive_chunked_scores(model, ids, chunk):
    """Per layer [B, Hkv, T]: for each replay chunk, fed over the context alone (eager, every probability), each
    query's row renormalised over the sinks, the chunk and the replay's own keys; the max over the group, the
    queries and the chunks."""
    full = DynamicCache(config=model.config) if model.config.model_type.startswith("gemma") else DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    kv = full.layers[0].keys.shape[1]
    scores = None
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")  # every probability (sdpa returns none)
    try:
        with torch.no_grad():
            replays = [(start, stop, replay, model(replay, past_key_values=deepcopy(full), use_cache=True,
                                                   output_attentions=True).attentions)
                       for start, stop, replay in Replay(TOKENIZER, chunk=chunk).inputs(ids, None)]
    finally:
        model.set_attn_implementation(attn)
    for start, stop, replay, probs in replays:
        assert len(probs) == model.config.num_hidden_layers
        r = replay.shape[1]
        chosen = torch.zeros(T + r, dtype=torch.bool)
        chosen[:SINKS] = True
        chosen[start:stop] = True
        chosen[T:] = True
        per_layer = []
        for p in probs:
            if p.shape[-1] != T + r:  # a sliding-window layer (its window's keys only): never scored
                per_layer.append(None)
                continue
            p = p.float() * chosen
            p = p / p.sum(-1, keepdim=True)
            b, hq = p.shape[:2]
            per_layer.append(p.view(b, kv, hq // kv, r, T + r)[..., :T].amax(dim=(2, 3)))
        scores = per_layer if scores is None else [None if a is None else torch.maximum(a, c)
                                                   for a, c in zip(scores, per_layer)]
    return scores


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3", "gemma3"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_chunked_replay_scores_equal_their_definition_and_the_replay_never_stays(family, attn):
    model = tiny_model(family, attn)
    ids = token_ids(T, batch=2)
    cache = h2o.make_cache(model, f"kvzip_{SINKS}_4_64", buffer=4, tokenizer=TOKENIZER)  # budget > T: nothing evicted
    cache.replayer = Replay(TOKENIZER, chunk=CHUNK)  # three chunks: 12, 12, 6
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    h2o.restore(model)
    expect = naive_chunked_scores(model, ids, CHUNK)
    compared = 0
    for layer, want in zip(cache.layers, expect):
        if not isinstance(layer, h2o.CompressedLayer):  # a hybrid model's sliding-window layer: the replay left no trace
            assert layer.cumulative_length == T and layer.keys.shape[-2] == min(T, layer.sliding_window - 1)
            continue
        compared += 1
        assert layer.seen == T and layer.length == T  # the replays' tokens are gone
        assert torch.equal(layer.times[0, 0], torch.arange(T))
        torch.testing.assert_close(layer.scores, want, rtol=1e-4, atol=1e-5)
    assert compared == len(h2o.models.compressed_layers(model.config))
    assert not cache.held and not cache.replaying


def test_the_replay_prompts_ask_for_the_context_then_for_each_part_starting_where_the_last_ended():
    replay = Replay(TOKENIZER, chunk=5, overlap=2)
    ids = torch.arange(40, 52).view(1, 12)
    parts = replay.inputs(ids, None)
    assert [(a, b) for a, b, _ in parts] == [(0, 5), (5, 10), (10, 12)]
    first, second = parts[0][2][0].tolist(), parts[1][2][0].tolist()
    assert first == replay.first + replay.suffix + list(range(40, 45))
    assert second == replay.next + [43, 44] + replay.suffix + list(range(45, 50))
    # a later forward (the streaming protocol) asks for its part starting with the previous forward's last tokens
    later = replay.inputs(torch.tensor([[60, 61]]), previous=torch.tensor([[50, 51]]))
    assert later[0][2][0].tolist() == replay.next + [50, 51] + replay.suffix + [60, 61]


def test_streaming_protocol_scores_every_chunk_before_it_can_be_evicted(monkeypatch):
    model = tiny_model("llama")
    ids = token_ids(48)
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    windows, sizes = [], []
    real = cache.replay_window

    def record(window):
        if window is not None:
            windows.append(window)
            sizes.append(cache.kept_lengths())  # what the layers hold when the replay starts: nothing evicted yet
        real(window)
    monkeypatch.setattr(cache, "replay_window", record)
    with torch.no_grad():
        for start in range(0, 48, 16):
            model(ids[:, start:start + 16], past_key_values=cache, use_cache=True)
            assert max(cache.kept_lengths()) <= 12 + 2
        for _ in range(5):  # decoding: nothing replayed
            model(ids[:, :1], past_key_values=cache, use_cache=True)
    h2o.restore(model)
    assert windows == [(0, 16), (16, 32), (32, 48)]
    assert sizes[0] == [16, 16] and sizes[1] == [12 + 16] * 2 and sizes[2] == [12 + 16] * 2


def test_global_kvzip_shares_one_budget_across_layers():
    model = tiny_model("llama", layers=3)
    cache = h2o.make_cache(model, "global+kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    with torch.no_grad():
        model(token_ids(40), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    lengths = cache.head_lengths()
    assert sum(map(sum, lengths)) == 3 * 2 * 12 and len({sum(layer) for layer in lengths}) > 1, lengths


def test_what_a_replay_cannot_serve_is_refused_before_it_runs():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        h2o.make_cache(model, "kvzip_2_4_12")
    cache = h2o.make_cache(model, "kvzip_2_4_12", tokenizer=TOKENIZER)
    ids = token_ids(20, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(ValueError, match="without padding"), torch.no_grad():
        model(ids, attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="not inputs_embeds"), torch.no_grad():
        model(inputs_embeds=model.get_input_embeddings()(ids), past_key_values=cache)
    assert cache.get_seq_length() == 0  # nothing ran
    h2o.restore(model)


def test_a_forward_left_unreplayed_is_an_error_never_a_cache_that_stops_evicting():
    model = tiny_model("llama")
    cache = h2o.make_cache(model, "kvzip_2_4_12", buffer=2, tokenizer=TOKENIZER)
    base = model.base_model
    hooks = dict(base._forward_hooks)
    base._forward_hooks.clear()  # the replay hook gone (a model copied without it, a hook removed by hand)
    with torch.no_grad():
        model(token_ids(30), past_key_values=cache)
        assert cache.held and max(cache.kept_lengths()) == 30
        with pytest.raises(RuntimeError, match="never replayed"):
            model(token_ids(1), past_key_values=cache)
    base._forward_hooks.update(hooks)
    h2o.restore(model)


def test_kvzip_with_a_decode_rule_ranks_by_it_from_the_first_decode_step():
    model = tiny_model("llama")
    ids = token_ids(40)
    out = {}
    for name in ("kvzip_2_4_12", "kvzip_2_4_12+tova"):
        cache = h2o.make_cache(model, name, buffer=2, tokenizer=TOKENIZER)
        out[name] = model.generate(ids, past_key_values=cache, max_new_tokens=12, do_sample=False), cache
    h2o.restore(model)
    kv, then = out["kvzip_2_4_12"][1], out["kvzip_2_4_12+tova"][1]
    assert kv.policy.name == "kvzip_2_4_12" and then.policy.name == "kvzip_2_4_12+tova"
    assert max(kv.kept_lengths()) <= 14 and max(then.kept_lengths()) <= 14
    assert bool((then.layers[0].state["decoding"] > 0).all())


@pytest.mark.parametrize("block_elements", [None, 700])
def test_replay_scores_over_the_chosen_columns_equal_the_softmax_over_every_column_masked(block_elements):
    """`replay_attention` multiplies only the columns some row and head chose; the scores equal the definition
    computed over every column (the unchosen ones masked), rows and heads choosing different keys."""
    from h2o.attention import replay_attention

    torch.manual_seed(3)
    b, hq, hkv, q, length, d = 2, 6, 3, 7, 40, 8
    query, key = torch.randn(b, hq, q, d), torch.randn(b, hkv, length, d)
    chosen = torch.rand(b, hkv, length) < 0.3
    chosen[..., :2] = True
    chosen[..., length - q:] = True
    chosen[1, 2, 20] = True  # a key one row and head alone chose
    chosen[:, :, 21] = False  # a key nobody chose
    got = replay_attention(query, key, chosen, 0.3, block_elements=block_elements)
    logits = torch.einsum("bhgqd,bhkd->bhgqk", query.view(b, hkv, hq // hkv, q, d), key) * 0.3
    visible = chosen[:, :, None, None, :] & torch.ones(q, length, dtype=torch.bool).tril(length - q)
    expected = logits.masked_fill(~visible, -torch.inf).softmax(-1).amax(dim=(2, 3))
    assert torch.allclose(got, expected, atol=1e-6)
    assert got[1, 2, 20] > 0 and not got[..., 21].any() and not got[~chosen].any()
