"""Each registered rule against a naive reference on a tiny model: after one prefill, the cache keeps
exactly the tokens that the rule, computed by hand from eager attention probabilities and the
prefill's keys and values, would keep per KV head (sinks and recent window protected)."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

import h2o
from tiny import TOKENIZER, surrogate_for, surrogate_kw, tiny_model, token_ids

T, SINKS, RECENT, BUDGET = 24, 2, 3, 10


def grouped(probs, kv_heads):
    """[B, Hq, q, k] -> [B, Hkv, G, q, k]."""
    b, hq, q, k = probs.shape
    return probs.view(b, kv_heads, hq // kv_heads, q, k)


def naive_scores(rule: str, probs, keys, values):
    """The rule's priority of every prefill token [B, Hkv, T], from its definition."""
    g = grouped(probs, keys.shape[1])
    mass = g.sum(dim=(2, 3))
    seen_by = (T - torch.arange(T)).float()
    if rule == "h2o_sum":
        return mass
    if rule == "h2o_mean":
        return mass / seen_by
    if rule == "tova":
        return g[:, :, :, -1].mean(dim=2)
    if rule == "a2sf":
        weights = 0.9 ** torch.arange(T - 1, -1, -1).float()
        return (g * weights.view(1, 1, 1, T, 1)).sum(dim=(2, 3))
    if rule == "vatp_sum":
        return mass * values.abs().sum(-1)
    if rule == "vatp_mean":
        return mass / seen_by * values.abs().sum(-1)
    if rule in ("vlen_sum", "vlen_mean"):
        weighted = g.mean(dim=2) * values.norm(dim=-1).unsqueeze(2)  # [B, Hkv, q, k]: group mean x ||v||_2
        vmass = (weighted / weighted.sum(dim=-1, keepdim=True)).sum(dim=2)
        return vmass if rule == "vlen_sum" else vmass / seen_by
    if rule == "knorm":
        return -keys.norm(dim=-1)
    if rule == "snapkv":
        window = (torch.arange(T) >= T - 4).float()
        pooled = (g * window.view(1, 1, 1, T, 1)).sum(dim=(2, 3))
        return F.avg_pool1d(pooled.reshape(-1, 1, T), 5, stride=1, padding=2, count_include_pad=False).view_as(pooled)
    if rule == "caote":
        a = g[:, :, :, -1].mean(dim=2)  # [B, Hkv, T]
        out = (a.unsqueeze(-1) * values).sum(dim=-2, keepdim=True)
        return a / (1 - a) * (values - out).norm(dim=-1)
    if rule == "keydiff":
        unit = F.normalize(keys, dim=-1)
        return -(unit * F.normalize(unit.mean(dim=-2, keepdim=True), dim=-1)).sum(-1)
    raise ValueError(rule)


CASES = {"h2o_sum": f"h2o_{SINKS}_{RECENT}_{BUDGET}_sum", "h2o_mean": f"h2o_{SINKS}_{RECENT}_{BUDGET}_mean",
         "tova": f"tova_{SINKS}_{RECENT}_{BUDGET}", "a2sf": f"a2sf_{SINKS}_{RECENT}_{BUDGET}_0.9",
         "vatp_sum": f"vatp_{SINKS}_{RECENT}_{BUDGET}_sum", "vatp_mean": f"vatp_{SINKS}_{RECENT}_{BUDGET}_mean",
         "knorm": f"knorm_{SINKS}_{RECENT}_{BUDGET}", "keydiff": f"keydiff_{SINKS}_{RECENT}_{BUDGET}",
         "snapkv": f"snapkv_{SINKS}_{RECENT}_{BUDGET}_4", "caote": f"caote_{SINKS}_{RECENT}_{BUDGET}",
         "vlen_sum": f"vlen_{SINKS}_{RECENT}_{BUDGET}_sum", "vlen_mean": f"vlen_{SINKS}_{RECENT}_{BUDGET}_mean",
         "kvzip": f"kvzip_{SINKS}_{RECENT}_{BUDGET}", "kvzap": f"kvzap_{SINKS}_{RECENT}_{BUDGET}"}


def naive_kvzap(surrogate, layer: int, keys, values):
    """kvzap's score from its definition: per KV head, the ridge regression of the surrogate on the standardised
    features (the norms of the key's rotated pairs, its unrotated dims, the value), written out by hand."""
    t, rot = surrogate.tensors, surrogate.rotary_dims
    half = rot // 2
    out = []
    for h in range(keys.shape[1]):
        k, v = keys[:, h], values[:, h]
        pairs = torch.sqrt(k[..., :half] ** 2 + k[..., half:rot] ** 2)
        x = torch.cat([pairs, k[..., rot:], v], dim=-1)
        z = (x - t["mean"][layer, h]) / t["std"][layer, h]
        out.append(z @ t["linear"][layer, h, :-1] + t["linear"][layer, h, -1])
    return torch.stack(out, dim=1)


def naive_kvzip(model, ids, full):
    """KVzip's score from its definition: after the prefill (in `full`, a DynamicCache), the replay (the instruction,
    the assistant's start, the context) fed over a copy of it with eager attention; per prefill token, the largest
    probability any replay query of its group gives it once each query's row is renormalised over the sinks, the
    context (one chunk: T tokens) and the replay's own keys (all of them here)."""
    from copy import deepcopy

    from h2o.replay import Replay
    replay = Replay(TOKENIZER).inputs(ids, None)
    assert len(replay) == 1
    with torch.no_grad():
        probs = model(replay[0][2], past_key_values=deepcopy(full), use_cache=True, output_attentions=True).attentions
    scores = []
    for p in probs:  # [B, Hq, r, T + r]; every key chosen (sinks within the context): the renormalisation is exact
        p = p.float() / p.float().sum(-1, keepdim=True)
        scores.append(grouped(p, full.layers[0].keys.shape[1])[..., :T].amax(dim=(2, 3)))
    return scores


def test_every_registered_rule_has_a_naive_reference():
    covered = {h2o.parse(name).NAME for name in CASES.values()}
    rules = {cls.NAME for cls in h2o.policies.registered().values() if cls.evicts and cls.NAME != "streaming"}
    assert rules <= covered, f"rules without a naive reference check: {sorted(rules - covered)}"


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rule", CASES)
def test_rule_keeps_what_its_definition_says(rule, family):
    model = tiny_model(family, "eager")
    ids = token_ids(T, batch=2)
    full = DynamicCache()
    with torch.no_grad():
        probs = model(ids, past_key_values=full, use_cache=True, output_attentions=True).attentions
    cache = h2o.make_cache(model, CASES[rule], **surrogate_kw(model, CASES[rule]), buffer=0, tokenizer=TOKENIZER)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    h2o.restore(model)
    replayed = naive_kvzip(model, ids, full) if rule == "kvzip" else None
    for i, (layer, p, reference) in enumerate(zip(cache.layers, probs, full.layers)):
        if rule == "kvzap":  # the same random surrogate make_cache was given (seeded), its formula by hand
            score = naive_kvzap(surrogate_for(model), i, reference.keys.float(), reference.values.float())
        else:
            score = replayed[i] if replayed else naive_scores(rule, p.float(), reference.keys.float(),
                                                              reference.values.float())
        middle = torch.arange(SINKS, T - RECENT)
        chosen = score[..., middle].topk(BUDGET - SINKS - RECENT, dim=-1).indices + SINKS
        expect = torch.cat([torch.arange(SINKS).expand(*chosen.shape[:2], -1), chosen,
                            torch.arange(T - RECENT, T).expand(*chosen.shape[:2], -1)], dim=-1).sort(-1).values
        if rule == "kvzap":  # the first layer's keys and values of one token id are the same at every position once
            # RoPE is read through its invariants: exact ties, which the two top-k break apart; the kept scores must be
            # the expected ones
            kept_scores = score.gather(-1, layer.times).sort(-1).values
            torch.testing.assert_close(kept_scores, score.gather(-1, expect).sort(-1).values, rtol=0, atol=1e-4)
            continue
        assert torch.equal(layer.times, expect), f"{rule}: kept {layer.times.tolist()}, expected {expect.tolist()}"


@pytest.mark.parametrize("make, message", [
    (lambda: h2o.parse("a2sf_4_8_64_0"), r"gamma must be a number in \(0, 1\]"),
    (lambda: h2o.parse("a2sf_4_8_64_1.5"), r"gamma must be a number in \(0, 1\]"),
    (lambda: h2o.parse("snapkv_4_8_64_65"), r"window must be an int in \[1, budget = 64\]"),
    (lambda: h2o.parse("tova_40_30_64"), "exceeds the budget"),
    (lambda: h2o.parse("knorm_4_8_0"), "budget must be > 0"),
    (lambda: h2o.parse("vatp_4_8_64_max"), "unknown VATP score rule"),
    (lambda: h2o.H2O(4, 8, 16.5), "must be an int"),
    (lambda: h2o.Streaming(True, 8), "must be an int"),
    (lambda: h2o.parse(h2o.H2O(4, 8, 64, "sum"), score="mean"), "has score rule 'sum' but score='mean'"),
    (lambda: h2o.parse("tova_4_8_64", score="sum"), "only applies to H2O"),
])
def test_bad_rule_parameters_are_refused(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_the_attention_function_computes_only_what_the_rule_observes(monkeypatch, attn):
    """knorm and keydiff observe nothing: no attention scores are computed for them. Under sdpa a rule that
    observes attention gets it from the one-pass attention (asked for exactly its observations); under eager,
    from the stock attention plus the scoring pass."""
    from h2o import attention
    calls = []
    for name in ("attention_mass", "last_query_row", "query_counts", "fused_attention"):
        real = getattr(attention, name)

        def spy(*a, _r=real, _n=name, **k):
            calls.append(_n if _n != "fused_attention" else f"fused:{'+'.join(sorted(a[6] if len(a) > 6 else k['wants']))}")
            return _r(*a, **k)
        monkeypatch.setattr(attention, name, spy)
    model = tiny_model("llama", attn)
    one_pass = attn == "sdpa"
    for policy, expect in [("knorm_2_2_8", []), ("keydiff_2_2_8", []),
                           ("tova_2_2_8", ["fused:last"] if one_pass else ["last_query_row"]),
                           ("h2o_2_2_8", ["fused:mass"] if one_pass else ["attention_mass"])]:
        calls.clear()
        cache = h2o.make_cache(model, policy, buffer=0, tokenizer=TOKENIZER)
        with torch.no_grad():
            model(token_ids(12), past_key_values=cache, use_cache=True)
            model(token_ids(1), past_key_values=cache, use_cache=True)
        assert sorted(set(calls)) == expect, policy
    h2o.restore(model)


def test_recommended_is_a_measured_rule_at_any_budget_and_a_name_everywhere():
    from h2o.policies import recommendation as recommended
    policy = h2o.recommended(256)
    assert policy == h2o.parse("recommended_256") == h2o.policies.at_budget("recommended", 256)
    assert policy.name == f"{recommended.ALLOCATION.name}+{recommended.RULE}_4_32_256_{recommended.SCORE}"
    assert policy.name == "retrieval_0.1_4+h2o_4_32_256_mean" and policy.budget == 256
    assert policy.recent == recommended.RECENT_SHARE * 256 and policy.sinks == 4
    assert "recommended" in h2o.policies.families()
    assert h2o.resolve(["recommended_128"]) == [h2o.recommended(128).name]
    for bad in (4, 16.0, True):
        with pytest.raises(ValueError, match="budget must be an int >= 8"):
            h2o.recommended(bad)
    with pytest.raises(ValueError, match="does not apply"):
        h2o.parse("recommended_256", score="sum")


def test_snapkv_hands_over_to_the_decode_rule():
    """snapkv_..+tova: SnapKV ranks after the prompt; from the first one-token forward on, every slot is ranked
    by TOVA's newest-query row, the prompt's SnapKV score no longer counts."""
    from h2o.cache import CompressedLayer, take_pending
    from h2o.policies import Observation
    policy = h2o.parse("snapkv_0_1_4_2+tova")
    assert policy.name == "snapkv_0_1_4_2+tova" and h2o.parse(policy.name) == policy
    layer = CompressedLayer(policy, buffer=0, reindex=False)
    x = torch.zeros(1, 1, 6, 2)
    layer.update(x, x)
    take_pending(layer.keys)
    prompt_mass = torch.tensor([[[0.0, 5.0, 0.1, 4.0, 0.2, 3.0]]])
    layer.observe(Observation(queries=6, mass=prompt_mass))
    # pooled over 5 neighbours (real ones only): 1.7, 2.275, 1.86, 2.46, 1.825 for tokens 0-4; token 5 is recent
    assert layer.times[0, 0].tolist() == [1, 2, 3, 5]
    layer.update(x[:, :, :1], x[:, :, :1])
    take_pending(layer.keys)
    row = torch.tensor([[[0.5, 0.0, 0.3, 0.1, 0.1]]])  # the newest query's row over tokens 1, 2, 3, 5, 6
    layer.observe(Observation(queries=1, last=row, mass=row))
    assert layer.times[0, 0].tolist() == [1, 3, 5, 6]  # TOVA's choice (token 6 recent); SnapKV's would keep 2
    assert layer.state["decoding"].eq(1).all()
    with pytest.raises(ValueError, match="decode-time rule"):
        h2o.parse("snapkv_4_32_256_16+streaming")


@pytest.mark.parametrize("name", ["snapkv_2_4_12_4+tova", "kvzip_2_4_12+h2o_mean", "h2o_2_4_12_mean"])
def test_a_parsed_policy_object_makes_a_cache_as_its_name_does(name):
    """`h2o tasks --policies snapkv_..+tova` once failed: the runner parses the name, then hands make_cache the object,
    a variant class (SnapKVThen) that the registry refused as "not a registered policy"."""
    policy = h2o.parse(name)
    assert h2o.parse(policy) is policy
    model = tiny_model("llama", "sdpa", layers=2)
    cache = h2o.make_cache(model, policy, tokenizer=TOKENIZER)
    assert cache.policy == policy
    h2o.restore(model)


def test_an_unregistered_subclass_is_refused_even_though_it_inherits_a_registered_name():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Quieter(type(h2o.parse("tova_2_4_12"))):
        def rank(self, state, times, seen, **slots):
            return -super().rank(state, times, seen, **slots)

    with pytest.raises(ValueError, match="not a registered policy"):
        h2o.parse(Quieter(2, 4, 12))
