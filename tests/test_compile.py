"""The static (compile-friendly) cache: torch.compile runs its decode step as one graph, never recompiling, and it
keeps exactly the eager cache's tokens (h2o.static).

Every registered rule goes through `torch.compile(model.forward, fullgraph=True)` (a graph break anywhere, in h2o's
code or in transformers', is an error) over >= 3 eviction cycles, with dynamo's own counters: one graph for every
decode step. The dynamo checks use the `aot_eager` backend (the functionalised graph, as inductor receives it,
without inductor's code generation, which takes ~20 s per graph here); `model.generate` with a compile config runs
inductor itself over 200 steps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters
from transformers import CompileConfig

import h2o
from h2o.policies import registered
from tiny import tiny_model, token_ids, surrogate_kw

BUFFER = 5  # an eviction every 6 decode steps
STEPS = 24  # 4 eviction cycles


def rules() -> list[str]:
    # a replaying rule (KVzip) is refused by the static layout (below): it scores the context after the forward
    names = [cls.sized(2, 4, 24).name for cls in registered().values() if cls.evicts and not cls.replays]
    return names + ["snapkv_2_4_24_16+h2o_mean"]  # SnapKV for the prompt, then a decode rule


def greedy(model, cache, ids, steps, forward):
    """Prefill (eager), then `steps` one-token forwards through `forward`: (logits [steps + 1, V], tokens, held)."""
    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        logits, held = [out.logits[0, -1]], []
        token = out.logits[:, -1:].argmax(-1)
        start = int(cache.get_seq_length())  # tokens seen (eager, outside the compiled steps)
        for step in range(steps):
            # the position as generate passes it: transformers 4.5x builds it from the cache's counter otherwise,
            # an arange from a tensor, which dynamo cannot trace (its StaticCache needs the same)
            position = torch.tensor([start + step])
            out = forward(input_ids=token, past_key_values=cache, cache_position=position)
            logits.append(out.logits[0, -1])
            token = out.logits[:, -1:].argmax(-1)
            held.append(cache.layers[0].length)
    return torch.stack(logits), held


def kept(cache) -> torch.Tensor:
    return torch.stack([layer.kept_mask() for layer in cache.layers])


@pytest.mark.parametrize("rule", rules())
def test_compiled_decode_is_one_graph_and_keeps_the_eager_tokens(rule):
    model = tiny_model("llama")
    ids = token_ids(40)
    eager = h2o.make_cache(model, rule, **surrogate_kw(model, rule), buffer=BUFFER)
    ref, ref_held = greedy(model, eager, ids, STEPS, model.forward)
    h2o.restore(model)

    torch._dynamo.reset()
    counters.clear()
    cache = h2o.make_cache(model, rule, **surrogate_kw(model, rule), buffer=BUFFER, static=True)
    compiled = torch.compile(model.forward, backend="aot_eager", fullgraph=True)
    got, held = greedy(model, cache, ids, STEPS, compiled)
    h2o.restore(model)

    evictions = sum(b < a for a, b in zip(held, held[1:]))
    assert evictions >= 3, held
    assert held == ref_held  # evicts at the eager cache's steps
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # compiled once, never again
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(kept(cache), kept(eager))  # the same tokens, per layer and KV head


@pytest.mark.parametrize("family", ["gpt_neox", "qwen2", "qwen3", "mistral"])
def test_every_family_compiles_to_one_graph(family):
    model = tiny_model(family)
    ids = token_ids(40)
    eager = h2o.make_cache(model, "h2o_2_4_24", buffer=BUFFER)
    ref, _ = greedy(model, eager, ids, STEPS, model.forward)
    h2o.restore(model)
    torch._dynamo.reset()
    counters.clear()
    cache = h2o.make_cache(model, "h2o_2_4_24", buffer=BUFFER, static=True)
    got, _ = greedy(model, cache, ids, STEPS, torch.compile(model.forward, backend="aot_eager", fullgraph=True))
    h2o.restore(model)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(kept(cache), kept(eager))


def test_generate_with_a_compile_config_runs_inductor_once_over_200_steps():
    model = tiny_model("llama")
    ids = token_ids(40)
    kw = dict(max_new_tokens=200, min_new_tokens=200, do_sample=False, return_dict_in_generate=True,
              output_scores=True)
    ref = model.generate(ids, past_key_values=h2o.make_cache(model, "h2o_2_4_24", buffer=BUFFER), **kw)
    h2o.restore(model)
    torch._dynamo.reset()
    counters.clear()
    config = CompileConfig(fullgraph=True)  # inductor
    config._compile_all_devices = True  # transformers compiles only on accelerators unless asked
    cache = h2o.make_cache(model, "h2o_2_4_24", buffer=BUFFER, static=True)
    got = model.generate(ids, past_key_values=cache, compile_config=config, **kw)
    h2o.restore(model)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # the prefill runs eager
    assert counters["stats"]["calls_captured"] > 0
    assert torch.equal(got.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(ref.scores), rtol=1e-4, atol=1e-4)


def test_static_layout_without_compiling_equals_the_eager_cache_after_a_chunk():
    """Decode, then a chunk of several tokens (back to the eager layout), then decode again."""
    model = tiny_model("llama")
    ids, chunk = token_ids(40), token_ids(7, seed=3)
    outs = []
    for static in (False, True):
        cache = h2o.make_cache(model, "tova_2_4_24", buffer=BUFFER, static=static)
        logits, _ = greedy(model, cache, ids, 9, model.forward)
        with torch.no_grad():
            mid = model(chunk, past_key_values=cache).logits[0]
        more, _ = greedy(model, cache, chunk[:, -1:], 9, model.forward)
        outs.append((torch.cat([logits, mid, more]), kept(cache)))
        h2o.restore(model)
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(outs[1][1], outs[0][1])


@pytest.mark.parametrize("policy, options, error", [
    ("adakv+h2o_2_4_24", {}, "uniform rule"),
    ("full", {}, "StaticCache"),
    ("h2o_2_4_24", {"positions": "reindex"}, "original positions"),
    ("kvzip_2_4_24", {}, "replaying rule"),
])
def test_what_the_static_cache_cannot_hold_is_refused(policy, options, error):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=error):
        h2o.make_cache(model, policy, **surrogate_kw(model, policy), static=True, **options)


def run_calls(model, cache, ids, mask, chunks, steps, tail):
    """The prompt in `chunks`, `steps` greedy one-token steps, then a `tail`-token chunk: every call's logits."""
    outs, start = [], 0
    with torch.no_grad():
        for size in chunks:
            end = start + size
            outs.append(model(ids[:, start:end], attention_mask=mask[:, :end], past_key_values=cache).logits)
            start = end
        token = outs[-1][:, -1:].argmax(-1)
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            outs.append(model(token, attention_mask=mask, past_key_values=cache).logits)
            token = outs[-1].argmax(-1)
        if tail:
            more = token_ids(tail, batch=ids.shape[0], seed=7)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], tail)], 1)
            outs.append(model(more, attention_mask=mask, past_key_values=cache).logits)
    return torch.cat(outs, 1)


@settings(max_examples=25, deadline=None)
@given(rule=st.sampled_from(["h2o_2_4_8", "streaming_2_8", "tova_2_4_8", "keydiff_2_4_8", "snapkv_2_4_8_4+h2o_mean"]),
       batch=st.integers(1, 3), pads=st.lists(st.integers(0, 5), min_size=3, max_size=3),
       chunks=st.lists(st.integers(1, 9), min_size=1, max_size=4), steps=st.integers(0, 8),
       tail=st.integers(0, 7), one_token_prompt=st.booleans())
def test_static_layout_equals_the_eager_cache_under_chunks_padding_and_batches(
        rule, batch, pads, chunks, steps, tail, one_token_prompt):
    """Issue 26: a prompt in chunks (the second chunk, a chunk after decoding), left-padded rows (through a prefill
    or fed one token a step with a growing mask): the static layout keeps the eager cache's tokens and logits."""
    model = tiny_model("llama")
    if one_token_prompt:
        chunks = [1] * 10
    ids = token_ids(sum(chunks), batch=batch)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, :min(pads[row], ids.shape[1] - 1)] = 0  # every row has a real token
    results = []
    for static in (False, True):
        cache = h2o.make_cache(model, rule, **surrogate_kw(model, rule), buffer=2, static=static)
        logits = run_calls(model, cache, ids, mask, chunks, steps, tail)
        results.append((logits, kept(cache)))
        h2o.restore(model)
    (ref, ref_kept), (got, got_kept) = results
    real = torch.cat([mask, mask.new_ones(batch, steps + tail)], 1).bool()  # padding's logits are never read
    assert torch.allclose(got[real], ref[real], atol=1e-4), (got - ref)[real].abs().max()
    assert ref_kept.shape == got_kept.shape == (2, batch, 2, real.shape[1])  # [layers, rows, KV heads, seen]
    positions = real[None, :, None, :].expand_as(ref_kept)  # which padding slots a layout holds is its own
    assert torch.equal(got_kept[positions], ref_kept[positions])


def test_issue_26_chunked_prompt_then_a_50_token_chunk_after_decoding():
    """The issue's case scaled to the tiny model: 64-token chunks on an h2o_4_32_128 static cache, some decoding, then
    a 50-token chunk (a false "left padding" error, then a size mismatch, before the fix)."""
    model = tiny_model("llama")
    ids = token_ids(192)
    mask = torch.ones_like(ids)
    results = []
    for static in (False, True):
        cache = h2o.make_cache(model, "h2o_4_32_128", static=static)
        results.append((run_calls(model, cache, ids, mask, [64, 64, 64], 5, 50), kept(cache)))
        h2o.restore(model)
    (ref, ref_kept), (got, got_kept) = results
    assert torch.allclose(got, ref, atol=1e-4)
    assert torch.equal(got_kept, ref_kept)


def test_compiled_decode_between_chunks_keeps_the_eager_tokens():
    """Issue 26, compiled: a prompt in two chunks (eager), compiled one-token steps, a chunk after them (eager: the
    static layout gathers back into arrival order), compiled steps again; one graph for every decode step."""
    model = tiny_model("llama")
    ids = token_ids(16, batch=2)
    more = token_ids(5, batch=2, seed=9)

    def run(static, step):
        cache = h2o.make_cache(model, "h2o_2_4_8", buffer=2, static=static)
        logits = []
        with torch.no_grad():
            for part in (ids[:, :7], ids[:, 7:], None, more, None):
                if part is not None:
                    logits.append(model(part, past_key_values=cache).logits)
                    continue
                token = logits[-1][:, -1:].argmax(-1)
                for _ in range(8):
                    seen = int(cache.get_seq_length())
                    out = step(input_ids=token, past_key_values=cache, cache_position=torch.tensor([seen]))
                    logits.append(out.logits)
                    token = out.logits[:, -1:].argmax(-1)
        h2o.restore(model)
        return torch.cat(logits, 1), kept(cache)

    ref, ref_kept = run(False, model.forward)
    counters.clear()
    got, got_kept = run(True, torch.compile(model.forward, backend="aot_eager", fullgraph=True))
    assert torch.allclose(got, ref, atol=1e-4) and torch.equal(got_kept, ref_kept)
    assert counters["stats"]["unique_graphs"] == 1


def test_compiled_generate_on_left_padded_rows_at_two_batch_sizes_equals_eager():
    """Issue 26: a second compiled generate at another batch size (a new static cache each) recompiles instead of
    failing in torch.cond's guards, and a left-padded row decodes as under the eager cache."""
    model = tiny_model("llama")
    config = CompileConfig(fullgraph=True, backend="aot_eager")
    config._compile_all_devices = True  # transformers compiles on CUDA only, unless told
    for batch in (2, 3):
        ids = token_ids(20, batch=batch)
        mask = torch.ones_like(ids)
        mask[-1, :4] = 0
        outs = []
        for static in (False, True):
            cache = h2o.make_cache(model, "h2o_2_4_8", buffer=2, static=static)
            extra = {"compile_config": config} if static else {}
            outs.append(model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=12,
                                       do_sample=False, **extra))
            h2o.restore(model)
        assert torch.equal(outs[0], outs[1])


def test_static_must_be_a_bool():
    with pytest.raises(TypeError, match="static must be a bool"):
        h2o.make_cache(tiny_model("llama"), "h2o_2_4_24", static="yes")
