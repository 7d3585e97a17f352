"""A budget shared across layers (`global_<floor>+<rule>`, `h2o.shared_budget`): the cache evicts all its layers
together after a forward, by one top-k over every layer's and KV head's priorities, each head keeping its floor."""

import math

import pytest
import torch

import h2o
from h2o.policies import Observation, parse
from h2o.policies.allocation import LayerPlan
from h2o.rows_layer import RowsLayer
from h2o.shared_budget import SharedBudget
from tiny import tiny_model, token_ids

TOL = dict(rtol=1e-4, atol=1e-4)


def shared_layers(policy, layers, heads, buffer):
    plan = LayerPlan(tuple(((h,), policy.budget) for h in range(heads)), joint=True, total=heads * policy.budget,
                     floor=policy.sinks + policy.recent + 1)
    shared = SharedBudget(layers * heads * policy.budget, plan.floor, buffer)
    out = [RowsLayer(plan, policy, buffer, reindex=False) for _ in range(layers)]
    for layer in out:
        shared.join(layer)
    return shared, out


def test_the_split_is_one_top_k_over_every_layer_and_head_with_a_floor():
    """Against a direct oracle: protected slots (sinks, recent) always kept, each head's `floor` best, then the best
    slots of all layers and heads together up to the shared total."""
    policy = parse("h2o_1_2_6_sum")
    layers, heads, buffer, q = 3, 2, 2, 14
    shared, cache = shared_layers(policy, layers, heads, buffer)
    g = torch.Generator().manual_seed(0)
    masses = {}
    for li, layer in enumerate(cache):
        ids = torch.arange(q, dtype=torch.float32).view(1, 1, q, 1).expand(1, heads, q, 3).contiguous()
        layer.update(ids, ids)
        for h, sub in enumerate(layer.rows[0].sublayers):
            # each layer its own scale: the split must move tokens across layers, not only across heads
            mass = torch.rand(1, 1, q, generator=g) * (li + 1)
            masses[li, h] = mass[0, 0]
            sub.observe(Observation(queries=q, mass=mass))
        assert layer.observed() is (li == layers - 1)  # only the last layer's report evicts
    protected = [t for t in range(q) if t < policy.sinks or t >= q - policy.recent]
    floor = shared.floor
    chosen = {key: set(protected) for key in masses}
    for key, mass in masses.items():  # each head's floor: its best slots, protected first
        order = protected + [t for t in mass.argsort(descending=True).tolist() if t not in protected]
        chosen[key] |= set(order[:floor])
    rest = sorted(((float(m[t]), key, t) for key, m in masses.items() for t in range(q) if t not in chosen[key]),
                  reverse=True)
    for _, key, t in rest[:shared.total - sum(len(c) for c in chosen.values())]:
        chosen[key].add(t)
    for (li, h), want in chosen.items():
        sub = cache[li].rows[0].sublayers[h]
        assert set(sub.times[0, 0].tolist()) == want, (li, h)
    per_layer = [sum(sub.length for sub in layer.sublayers) for layer in cache]
    assert sum(per_layer) == shared.total and len(set(per_layer)) > 1, per_layer  # layers really differ


def test_a_forward_that_skips_a_layer_is_an_error_never_a_cache_that_stops_evicting():
    policy = parse("h2o_1_2_6_sum")
    shared, cache = shared_layers(policy, 2, 1, 1)
    x = torch.zeros(1, 1, 4, 3)
    for _ in range(2):  # layer 0 observed twice, layer 1 never
        cache[0].update(x, x)
        cache[0].rows[0].sublayers[0].observe(Observation(queries=4, mass=torch.rand(1, 1, cache[0].length)))
        if _ == 1:
            with pytest.raises(RuntimeError, match="did not reach every layer"):
                cache[0].observed()
        else:
            assert cache[0].observed() is False
    cache[0].reset()  # a reset clears the budget's reports
    assert not shared._reported


@pytest.mark.parametrize("rule", ["h2o_2_4_12", "tova_2_4_12"])
def test_global_on_a_one_layer_model_is_adakv(rule):
    """With one layer, the shared budget is the layer's: global_<floor> keeps what adakv_<floor> keeps."""
    model = tiny_model("llama", "sdpa", layers=1)
    ids = token_ids(30)
    settings = dict(max_new_tokens=25, do_sample=False, output_logits=True, return_dict_in_generate=True)
    out = {}
    for alloc in ("adakv_0.3", "global_0.3"):
        cache = h2o.make_cache(model, f"{alloc}+{rule}", buffer=3)
        out[alloc] = model.generate(ids, **settings, past_key_values=cache), cache.head_lengths()
    h2o.restore(model)
    (a, la), (b, lb) = out["adakv_0.3"], out["global_0.3"]
    assert torch.equal(a.sequences, b.sequences) and la == lb
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), **TOL)


def test_global_shares_one_budget_across_layers_in_a_model():
    model = tiny_model("llama", "sdpa", layers=3)
    policy = h2o.parse("global_0.2+h2o_2_4_12")
    cache = h2o.make_cache(model, policy, buffer=2)
    with torch.no_grad():
        model(token_ids(40), past_key_values=cache)
    h2o.restore(model)
    heads = h2o.models.kv_heads(model.config)
    lengths = cache.head_lengths()
    per_layer = [sum(layer) for layer in lengths]
    assert sum(per_layer) == 3 * heads * 12 and len(set(per_layer)) > 1, per_layer
    floor = max(2 + 4, math.ceil(0.2 * 12))
    assert min(n for layer in lengths for n in layer) >= floor
