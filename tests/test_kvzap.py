"""A surrogate of KVzip's scores (`h2o.score_surrogate`) and the rule that ranks by it (`kvzap_...`): the features unchanged
by RoPE, the predictors against their formulas, the fit finding a planted relation, the file round trip, every layer
and head group scoring with its own predictors, the refusals before any work, and a fit on real text."""

import importlib.util

import pytest
import torch
from transformers import AutoTokenizer

import h2o
from h2o import rope
from h2o.eval import checkpoints
from h2o.score_surrogate import HIDDEN, Surrogate, features, fit_heads, top_overlap
from tiny import random_surrogate, surrogate_for, tiny_model, token_ids

EMBEDDED_MISSING = importlib.util.find_spec(checkpoints.SMOLLM2_PACKAGE) is None


def test_features_are_unchanged_by_any_rotation_of_the_keys():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 3, 5, 8, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 6, 2).float() / 6))  # 6 rotary dims of 8 (a partial rotary)
    moved = rope.rotate(keys, torch.randint(-50, 50, (2, 3, 5), generator=g), inv_freq, 6)
    torch.testing.assert_close(features(moved, values, 6), features(keys, values, 6))
    f = features(keys, values, 6)
    assert f.shape == (2, 3, 5, 3 + 2 + 8)  # 3 pair norms, 2 unrotated key dims, the value
    torch.testing.assert_close(f[..., 0], (keys[..., 0] ** 2 + keys[..., 3] ** 2).sqrt())
    assert torch.equal(f[..., 3:5], keys[..., 6:]) and torch.equal(f[..., 5:], values)
    with pytest.raises(ValueError, match="rotary_dims must be even"):
        features(keys, values, 5)


def test_predictions_follow_their_formulas_for_any_heads_of_any_layer():
    s = random_surrogate(layers=2, heads=3, head_dim=4, rotary_dims=4, seed=1)
    g = torch.Generator().manual_seed(2)
    keys, values = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 6, 4, generator=g)
    t, heads = s.tensors, (2, 0)  # a head group holding KV heads 2 and 0 of layer 1, in that order
    for i, h in enumerate(heads):
        z = (features(keys[0, i], values[0, i], 4) - t["mean"][1, h]) / t["std"][1, h]
        linear = z @ t["linear"][1, h, :-1] + t["linear"][1, h, -1]
        mlp = torch.nn.functional.gelu(z @ t["w1"][1, h] + t["b1"][1, h]) @ t["w2"][1, h] + t["b2"][1, h]
        torch.testing.assert_close(s.predict(1, heads, keys, values)[0, i], linear)
        torch.testing.assert_close(s.predict(1, heads, keys, values, "mlp")[0, i], mlp)
    with pytest.raises(ValueError, match="kind must be one of"):
        s.predict(0, (0,), keys[:, :1], values[:, :1], "tree")


def test_the_file_round_trips_exactly(tmp_path):
    s = random_surrogate(layers=2, heads=3, head_dim=4, rotary_dims=2, seed=3)
    s.method = {"held_out": {"linear": {"mean_spearman": 0.5}}}
    back = Surrogate.load(s.save(tmp_path / "s.safetensors"))
    assert back.method == s.method and (back.rotary_dims, back.head_dim, back.shape) == (2, 4, (2, 3))
    assert all(torch.equal(back.tensors[n], s.tensors[n]) for n in s.tensors)
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(Exception):
        Surrogate.load(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="shape"):
        Surrogate(2, 4, {**s.tensors, "w2": torch.zeros(2, 3, HIDDEN + 1)})


def test_the_fit_finds_a_planted_relation():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 5, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0]) + 2.0
    y = x @ torch.tensor([0.5, -0.1, 4.0, 0.0, 1.0]) - 3.0 + 0.01 * torch.randn(600, generator=g)
    # two heads fitted at once: the relation, and its negation (each head its own fit)
    both = fit_heads(torch.stack([x[:400], x[:400]]), torch.stack([y[:400], -y[:400]]))
    for i, sign in enumerate((1, -1)):
        fitted = {name: t[i] for name, t in both.items()}
        z = (x[400:] - fitted["mean"]) / fitted["std"]
        linear = z @ fitted["linear"][:-1] + fitted["linear"][-1]
        assert float((linear - sign * y[400:]).abs().max()) < 0.1
        mlp = torch.nn.functional.gelu(z @ fitted["w1"] + fitted["b1"]) @ fitted["w2"] + fitted["b2"]
        assert top_overlap(mlp, sign * y[400:]) >= 0.8 and top_overlap(linear, sign * y[400:]) == 1.0


def test_top_overlap_counts_the_true_top_share_found():
    true = torch.arange(10.0)
    assert top_overlap(true, true, 0.2) == 1.0
    assert top_overlap(-true, true, 0.2) == 0.0
    assert top_overlap(torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, 1, 0.0]), true, 0.2) == 0.5


@pytest.mark.parametrize("name", ["kvzap_2_4_12", "kvzap_2_4_12_mlp", "adakv+kvzap_2_4_12",
                                  "retrieval_0.25_2+kvzap_2_4_12", "global+kvzap_2_4_12"])
def test_every_layer_and_head_group_scores_with_its_own_predictors(name):
    """Each kept slot's score is the bound surrogate's prediction for its own layer and KV head, from its key and value
    as the cache holds them, whatever the layout (one layer, head groups, one group per head, the shared budget)."""
    model = tiny_model("llama")
    surrogate = surrogate_for(model)
    scores = {"retrieval": torch.tensor([[0.9, 0.1], [0.2, 0.3]])}
    cache = h2o.make_cache(model, name, buffer=2, surrogate=surrogate, head_scores=scores)
    with torch.no_grad():
        model(token_ids(40), past_key_values=cache, use_cache=True)
        for t in token_ids(5, seed=3)[0]:
            model(t.view(1, 1), past_key_values=cache, use_cache=True)
    kind = "mlp" if name.endswith("_mlp") else "linear"
    checked = 0
    for j, layer in enumerate(cache.policy_layers()):
        groups = [(tuple(range(2)), layer)] if isinstance(layer, h2o.CompressedLayer) else \
            [(heads, sub) for (heads, _), sub in zip(layer.plan.groups, layer.sublayers)] if hasattr(layer, "plan") \
            and not hasattr(layer, "rows") else \
            [(heads, sub) for row in layer.rows for (heads, _), sub in zip(row.plan.groups, row.sublayers)]
        for heads, sub in groups:
            expected = surrogate.predict(j, heads, sub.keys, sub.values, kind)
            torch.testing.assert_close(sub.state["score"], expected)
            checked += 1
    assert checked >= 2 and max(cache.kept_lengths()) < 45  # it evicted
    h2o.restore(model)


def test_a_kvzap_cache_keeps_the_tokens_its_surrogate_ranks_first():
    model = tiny_model("llama")
    surrogate = surrogate_for(model, seed=5)
    cache = h2o.make_cache(model, "kvzap_2_3_10", buffer=0, surrogate=surrogate)
    full = h2o.make_cache(model, "full")
    ids = token_ids(30)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
        model(ids, past_key_values=full, use_cache=True)
    for j, layer in enumerate(cache.policy_layers()):
        keys, values = full.layers[j].keys, full.layers[j].values
        score = surrogate.predict(j, (0, 1), keys, values)[0]  # [heads, 30]
        for h in range(2):
            middle = score[h, 2:27]  # not the sinks (2) nor the recent window (3)
            top = set((middle.topk(5).indices + 2).tolist())
            assert set(layer.times[0, h].tolist()) == {0, 1, 27, 28, 29} | top
    h2o.restore(model)


def test_refusals_come_before_any_work():
    model = tiny_model("llama")
    surrogate = surrogate_for(model)
    with pytest.raises(ValueError, match="surrogate=h2o.fit_surrogate"):
        h2o.make_cache(model, "kvzap_2_4_12")
    with pytest.raises(ValueError, match="does not rank by a surrogate"):
        h2o.make_cache(model, "h2o_2_4_12", surrogate=surrogate)
    with pytest.raises(ValueError, match="fit one on this model"):
        h2o.make_cache(model, "kvzap_2_4_12", surrogate=random_surrogate(3, 2, 16, 16))
    with pytest.raises(TypeError, match="must be an h2o.Surrogate"):
        h2o.make_cache(model, "kvzap_2_4_12", surrogate={"linear": 1})
    assert model.config._attn_implementation == "sdpa"  # nothing was switched
    with pytest.raises(ValueError, match="none is bound"):  # an unbound rule, used without make_cache
        h2o.parse("kvzap_2_4_12").initial_state(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16))
    assert h2o.parse("kvzap_4_32_256_mlp").mlp and h2o.parse("kvzap_4_32_256_mlp").name == "kvzap_4_32_256_mlp"
    assert "kvzap" not in h2o.policies.decode_rules()


def test_the_fit_on_real_text_reports_its_held_out_fit():
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's tokenizer package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(checkpoints.smollm2_copy())
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    text = " ".join(f"Line {i} of the calibration text speaks of {w}." for i, w in enumerate(["rivers", "hills"] * 60))
    bar = type("Bar", (), {"n": 0, "update": lambda self, k: setattr(self, "n", self.n + k)})()
    s = h2o.fit_surrogate(model, tok, [text], tokens=192, progress=bar)
    assert bar.n == 2 + 2  # 2 windows (the last held out), then 2 layers
    assert s.shape == (2, 2) and s.method["windows"] == [97, 97]  # 2 x 96 tokens, each after BOS and s.method["held_out_window"] == 1
    for kind in ("linear", "mlp"):
        held = s.method["held_out"][kind]
        assert len(held["spearman"]) == 2 and all(-1 <= v <= 1 for row in held["spearman"] for v in row)
        assert 0 <= held["mean_top_overlap"] <= 1
    assert model.config._attn_implementation == "sdpa" and not model.model._forward_pre_hooks  # left as it was
    with pytest.raises(ValueError, match="at least 64 calibration tokens"):
        h2o.fit_surrogate(model, tok, [text], tokens=63)
    cache = h2o.make_cache(model, "global+kvzap_2_4_16", surrogate=s)
    with torch.no_grad():
        model(torch.tensor([tok.encode(text)[:60]]), past_key_values=cache, use_cache=True)
    assert sum(map(sum, cache.head_lengths())) <= 2 * 2 * (16 + 64)
    h2o.restore(model)


def h2o_cli(*argv) -> int:
    from h2o.eval import cli

    return cli.main([str(a) for a in argv])


@pytest.mark.parametrize("argv, message", [
    (["--model", "random:tiny-llama"], "a random-weight model has none"),
    (["--calibration-tokens", 63], "--calibration-tokens must be >= 64"),
    (["--calibration-book", "99999999"], "no PG-19 test book '99999999'"),
])
def test_h2o_surrogate_refuses_bad_input_before_the_model_loads(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    out = tmp_path / "out"
    assert h2o_cli("surrogate", *argv, "--out", out) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_h2o_surrogate_fits_caches_and_reuses_on_the_embedded_model(tmp_path, monkeypatch, capsys):
    if EMBEDDED_MISSING:
        pytest.skip(f"the embedded model's weights package {checkpoints.SMOLLM2_PACKAGE} is not installed")
    import csv
    import json

    from h2o.eval import surrogate_cache

    checkpoints.smollm2_copy()
    monkeypatch.setattr(surrogate_cache, "cache_path", lambda name, tokens: tmp_path / "cache" / f"s{tokens}.safetensors")
    out = tmp_path / "out"
    assert h2o_cli("surrogate", "--calibration-tokens", 128, "--threads", 2, "--no-progress", "--out", out) == 0
    rows = list(csv.DictReader(open(out / "surrogate.csv")))
    assert [r["layer"] for r in rows] == [str(i) for i in range(30)] + ["all"]
    assert all(-1 <= float(r["linear_spearman"]) <= 1 and 0 <= float(r["mlp_top"]) <= 1 for r in rows)
    record = json.loads((out / "surrogate.json").read_text())
    assert record["method"]["windows"] == [65, 65] and record["method"]["texts"] == ["pg19:3129"]
    assert record["reused"] is False and (tmp_path / "cache" / "s128.safetensors").is_file()
    assert (out / "surrogate.png").stat().st_size > 10_000
    assert "held-out fit of the surrogate" in capsys.readouterr().out
    assert h2o_cli("surrogate", "--calibration-tokens", 128, "--threads", 2, "--no-progress", "--out", out) == 0
    assert "cached surrogate reused" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen3", "mistral", "gemma3"])
def test_the_rotated_dims_read_from_the_config_are_those_the_model_rotates(family):
    from h2o.models import rotary_dims, rotary_embedding

    model = tiny_model(family, "eager" if family == "gemma3" else "sdpa")
    expected = {"gpt_neox": 4}.get(family, 16)  # GPT-NeoX rotates 25% of its 16 dims
    assert rotary_dims(model.config) == expected
    if family != "gemma3":  # two RoPE modules (one per layer type): its frequencies are not read in one place
        assert rotary_embedding(model)[1] == expected


def test_the_mlp_surrogate_is_a_family_of_its_own():
    """`h2o tasks --policies kvzap_mlp` (a family sized per prompt) names the MLP, never the ridge silently."""
    from h2o.policies import at_budget, families, is_family

    assert "kvzap_mlp" in families() and is_family("global+kvzap_mlp")
    assert at_budget("kvzap_mlp", 800).name == "kvzap_4_100_800_mlp" and at_budget("kvzap_mlp", 800).mlp
    assert at_budget("global+kvzap_mlp", 800).name == "global_0.2+kvzap_4_100_800_mlp"
    assert not at_budget("kvzap", 800).mlp
