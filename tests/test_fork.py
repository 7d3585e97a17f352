"""Compress once, ask many (`CompressedCache.fork`): a fork answers as the compressed context itself would, and
nothing run on a fork changes the cache it came from."""

import pytest
import torch

import h2o
from h2o.cache import storage_bytes
from tiny import TOKENIZER, tiny_model, token_ids, surrogate_kw

_MODELS: dict = {}


def model_for(family: str):
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family, "eager" if family == "gemma3" else "sdpa")
    return _MODELS[family]


def scores_for(model):
    from h2o.models import compressed_layers
    shape = (len(compressed_layers(model.config)), h2o.models.kv_heads(model.config))
    g = torch.Generator().manual_seed(0)
    return {name: torch.rand(shape, generator=g) for name in ("retrieval", "induction", "ablation", "reconstruction")}


def snapshot(cache) -> dict:
    """Every tensor the cache holds, copied, by name (the kept tokens and all bookkeeping), and its kept masks."""
    held = {f"{i}:{name}": t.clone() for i, (name, t) in enumerate(cache.held_tensors())}
    masks = [layer.kept_mask().clone() for layer in cache.policy_layers() if hasattr(layer, "kept_mask")]
    return {"held": held, "masks": masks, "seen": cache.get_seq_length()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def assert_same(a: dict, b: dict) -> None:
    assert a["seen"] == b["seen"]
    assert a["held"].keys() == b["held"].keys()
    for name in a["held"]:  # bit for bit (a buffer's free slots may hold NaN bit patterns: torch.empty)
        assert torch.equal(bits(a["held"][name]), bits(b["held"][name])), name
    assert len(a["masks"]) == len(b["masks"]) and all(torch.equal(x, y) for x, y in zip(a["masks"], b["masks"]))


def make(model, policy, static=False):
    return h2o.make_cache(model, policy, **surrogate_kw(model, policy), buffer=3, head_scores=scores_for(model), tokenizer=TOKENIZER, static=static)


CASES = [("llama", "h2o_2_4_12"), ("llama", "streaming_2_10"), ("llama", "tova_2_4_12"), ("llama", "snapkv_2_4_12_4"),
         ("llama", "kvzip_2_4_12"), ("llama", "global+kvzip_2_4_12"), ("llama", "adakv+h2o_2_4_12"),
         ("llama", "global+h2o_2_4_12"), ("llama", "retrieval_0.3_2+h2o_2_4_12"), ("llama", "pyramid_4+h2o_2_4_12"),
         ("llama", "headkv+h2o_2_4_12"), ("llama", "full"), ("gemma3", "h2o_2_4_12"), ("gemma3", "full"),
         ("llama", "h2o_2_4_12 static")]


@pytest.mark.parametrize("family,policy", CASES)
def test_each_question_from_a_fork_is_answered_as_from_the_compressed_context_and_leaves_it_unchanged(family,
                                                                                                      policy):
    """Compress a 40-token context once; answer three questions of different lengths, each from its own fork, by
    `generate` (8 new tokens, the cache evicting as it goes). Each answer (tokens and logits) equals the answer of a
    cache that compressed the same context anew and was asked that question directly, and after every answer the
    compressed context holds exactly what it held before (every tensor, bit for bit)."""
    policy, static = policy.replace(" static", ""), policy.endswith("static")
    model = model_for(family)
    context = token_ids(40, seed=5)
    questions = [token_ids(n, seed=10 + n) for n in (6, 1, 11)]
    settings = dict(max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    try:
        with torch.no_grad():
            compressed = make(model, policy, static)
            model(context, past_key_values=compressed, use_cache=True)
            before = snapshot(compressed)
            for question in questions:
                ids = torch.cat([context, question], dim=1)
                fork = compressed.fork()
                answer = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=fork, **settings)
                assert_same(snapshot(compressed), before)
                anew = make(model, policy, static)
                model(context, past_key_values=anew, use_cache=True)
                expected = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=anew, **settings)
                assert torch.equal(answer.sequences, expected.sequences)
                torch.testing.assert_close(torch.stack(answer.logits), torch.stack(expected.logits), rtol=0, atol=0)
    finally:
        h2o.restore(model)


@pytest.mark.parametrize("policy", ["h2o_2_4_12", "retrieval_0.3_2+h2o_2_4_12", "kvzip_2_4_12", "full"])
def test_a_fork_copies_the_compressed_layers_and_shares_what_is_never_written_in_place(policy):
    """A fork's compressed layers own their buffers (no storage in common with the original); it holds the bytes the
    original holds; a full-cache layer's keys and values are shared (transformers' layers make new tensors at every
    update), so two caches holding them count them once together."""
    model = model_for("llama")
    try:
        with torch.no_grad():
            cache = make(model, policy)
            model(token_ids(40, seed=5), past_key_values=cache, use_cache=True)
            fork = cache.fork()
            assert fork.kv_bytes() == cache.kv_bytes()
            mine = {t.untyped_storage().data_ptr() for layer in cache.compressed_layers()
                    for t in layer.slot_tensors().values()}
            theirs = {t.untyped_storage().data_ptr() for layer in fork.compressed_layers()
                      for t in layer.slot_tensors().values()}
            assert not mine & theirs
            both = [t for _, t in cache.held_tensors()] + [t for _, t in fork.held_tensors()]
            together = storage_bytes(both)
            if policy == "full":
                assert together == cache.kv_bytes()  # every tensor shared
            else:  # shared: a replaying rule's last tokens fed (the next replay's prompt), never written in place
                tail = storage_bytes([cache.replay_tail]) if cache.replay_tail is not None else 0
                assert together == 2 * cache.kv_bytes() - tail
            assert fork.policy == cache.policy and fork.model_config is cache.model_config
    finally:
        h2o.restore(model)


def test_a_fork_of_a_fork_and_a_fork_after_more_context_answer_as_the_cache_would():
    """Forks nest (a fork is a cache like any other), and the original may go on taking context after forks were
    made from it: each fork keeps what it was forked from."""
    model = model_for("llama")
    try:
        with torch.no_grad():
            cache = make(model, "h2o_2_4_12")
            ids = token_ids(60, seed=6)
            model(ids[:, :30], past_key_values=cache, use_cache=True)
            early = cache.fork()
            early_state = snapshot(early)
            model(ids[:, 30:45], past_key_values=cache, use_cache=True)
            later = cache.fork().fork()
            out = model(ids[:, 45:50], past_key_values=later, use_cache=True).logits
            expected = model(ids[:, 45:50], past_key_values=cache, use_cache=True).logits
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            assert_same(snapshot(early), early_state)
    finally:
        h2o.restore(model)


def test_what_cannot_be_forked_is_refused_before_anything_is_copied():
    model = model_for("llama")
    try:
        with torch.no_grad():
            cache = make(model, "kvzip_2_4_12")
            model(token_ids(30, seed=5), past_key_values=cache, use_cache=True)
            cache.hold()  # a forward's tokens waiting for their replay
            with pytest.raises(RuntimeError, match="replay has not scored"):
                cache.fork()
            cache.reset()
            cache.interrupted = "the replay was interrupted (KeyboardInterrupt)"
            with pytest.raises(RuntimeError, match="interrupted"):
                cache.fork()
            uniform = make(model, "h2o_2_4_12")
            model(token_ids(30, seed=5), past_key_values=uniform, use_cache=True)
            layer = uniform.layers[0]
            layer.update(torch.zeros_like(layer.keys[:, :, :1]), torch.zeros_like(layer.values[:, :, :1]))
            with pytest.raises(RuntimeError, match="middle of a forward"):
                uniform.fork()
    finally:
        h2o.restore(model)
