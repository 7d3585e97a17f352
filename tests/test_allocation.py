"""Allocations (h2o.policies.allocation): names, the budgets each plans, and Ada-KV's split as a pure function."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import h2o
from h2o.policies.allocation import AdaKV, Allocated, HeadKV, HeadShare, Pyramid, split_budget, water_fill


@pytest.mark.parametrize("name, expect", [
    ("adakv+h2o_4_32_256", "adakv_0.2+h2o_4_32_256_mean"),
    ("retrieval+tova_4_32_256", "retrieval_0.1_4+tova_4_32_256"),
    ("induction_0.05_6+streaming_4_252", "induction_0.05_6+streaming_4_252"),
    ("pyramid_8+snapkv_4_32_256_16+tova", "pyramid_8+snapkv_4_32_256_16+tova"),
    ("headkv+h2o_4_32_256", "headkv_0.2+h2o_4_32_256_mean"), ("global+tova_4_32_256", "global_0.2+tova_4_32_256"),
    ("headkv_0.2_4+h2o_4_32_256", "headkv_0.2+h2o_4_32_256_mean"), ("headkv_0.1_6+tova_4_32_256", "headkv_0.1_6+tova_4_32_256"),
    ("global_0.1+kvzip_4_32_256", "global_0.1+kvzip_4_32_256"),
])
def test_names_parse_to_their_canonical_form(name, expect):
    policy = h2o.parse(name)
    assert isinstance(policy, Allocated) and policy.name == expect and h2o.parse(expect).name == expect
    assert policy.budget == policy.rule.budget  # the average budget per KV head is the rule's


@pytest.mark.parametrize("name, message", [
    ("adakv_2+h2o_4_32_256", "floor must lie in"), ("retrieval_0.1+h2o_4_32_256", "retrieval_<share>_<factor>"),
    ("retrieval_1.5_4+h2o_4_32_256", "share must lie"), ("pyramid_0.5+h2o_4_32_256", "beta must be"),
    ("adakv+full", "evicting rule"), ("adakv+nonsense_1_2_3", "unknown policy"),
    ("headkv_1.5+h2o_4_32_256", "floor must lie in"), ("global_2+h2o_4_32_256", "floor must lie in"),
    ("headkv_0.2_0.5+h2o_4_32_256", "factor must be a number >= 1"), ("headkv_0.2_4_1+h2o_4_32_256", "headkv_<floor>_<factor>"),
])
def test_bad_names_are_clear_errors(name, message):
    with pytest.raises(ValueError, match=message):
        h2o.parse(name)


def test_family_sizing_and_score_rules_go_to_the_rule():
    assert h2o.policies.at_budget("adakv+h2o_sum", 200).name == "adakv_0.2+h2o_4_25_200_sum"
    assert h2o.resolve(["pyramid+h2o_4_32_256"], "sum") == ["pyramid_20+h2o_4_32_256_sum"]
    assert h2o.policies.is_family("retrieval+h2o_mean") and not h2o.policies.is_family("retrieval+nope")


def test_each_allocation_holds_at_most_the_uniform_budget_in_total():
    rule = h2o.parse("h2o_4_25_200")
    layers, heads = 30, 3
    scores = {"retrieval": torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))}
    for alloc in (HeadShare("retrieval", 0.1, 4), Pyramid(20), AdaKV(0.2)):
        plans = alloc.plan(rule, layers, heads, scores)
        total = sum(len(g) * b for p in plans for g, b in p.groups)
        assert total <= layers * heads * rule.budget, alloc
        if isinstance(alloc, HeadShare):  # 9 of 90 heads at 4 x 200; the others (18000 - 7200) // 81 = 133
            budgets = sorted(b for p in plans for g, b in p.groups for _ in g)
            assert budgets.count(800) == 9 and set(budgets) == {133, 800}
            top = {divmod(int(i), heads) for i in scores["retrieval"].flatten().argsort(descending=True)[:9]}
            assert {(layer, h) for layer, p in enumerate(plans) for g, b in p.groups if b == 800 for h in g} == top
        if isinstance(alloc, Pyramid):  # falls with depth
            per_layer = [p.groups[0][1] for p in plans]
            assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > 200 > per_layer[-1] >= 4 + 25 + 1


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 12), min_size=2, max_size=4), st.integers(0, 4),
       st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_split_budget_is_the_top_k_of_all_heads_with_a_floor(batch, lengths, floor, total, seed):
    if total < floor * len(lengths):
        with pytest.raises(ValueError, match="cannot give"):
            split_budget([torch.zeros(batch, 1, n) for n in lengths], total, floor)
        return
    g = torch.Generator().manual_seed(seed)
    ranks = []
    for n in lengths:
        r = torch.rand(batch, 1, n, generator=g)
        r[torch.rand(batch, 1, n, generator=g) < 0.2] = -torch.inf  # slots without a real token
        ranks.append(r)
    counts = split_budget(ranks, total, floor)
    for b in range(batch):
        real = [int((r[b, 0] > -torch.inf).sum()) for r in ranks]
        assert counts[b].sum() == min(total, sum(real))
        for h, n in enumerate(real):
            assert min(floor, n) <= counts[b, h] <= n
        # brute force: floors first, then the best remaining slots of all heads together
        chosen = [sorted(r[b, 0][r[b, 0] > -torch.inf].tolist(), reverse=True) for r in ranks]
        rest = sorted(((v, h) for h, c in enumerate(chosen) for v in c[floor:]), reverse=True)
        left = max(0, total - sum(min(floor, len(c)) for c in chosen))
        expect = [min(floor, len(c)) for c in chosen]
        for _, h in rest[:left]:
            expect[h] += 1
        assert counts[b].tolist() == expect


# --- head scores: every entry point refuses a malformed table the same way (issue 26) ---------------------------------

GOOD = [[0.1, 0.9], [0.4, 0.2]]  # [2 layers, 2 KV heads]: the tiny llama's shape


def malformed_tables():
    """Drawn tables no allocation may rank by: NaN or inf, outside [0, 1], a wrong rank or an empty one, ragged or
    non-numeric rows, booleans or complex numbers, in the containers a user might pass (tensor, numpy, lists)."""
    bad_value = st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.1, 1.5, 1e40])
    spoiled = st.tuples(st.integers(0, 1), st.integers(0, 1), bad_value).map(
        lambda t: [[t[2] if (i, j) == t[:2] else v for j, v in enumerate(row)] for i, row in enumerate(GOOD)])
    shaped = st.sampled_from([[0.5], [[[0.5]]], [], [[]], 0.5, [[0.1, 0.2], [0.3]], [["a", "b"], ["c", "d"]],
                              [[None, 0.1], [0.2, 0.3]], "0.5", {"a": 1}])
    typed = st.sampled_from([torch.ones(2, 2, dtype=torch.bool), torch.full((2, 2), 0.5j),
                             np.array([["x", "y"], ["z", "w"]]), np.array([[object(), 1], [2, 3]], dtype=object)])
    table = st.one_of(spoiled, shaped, typed)
    container = st.sampled_from(["list", "tensor", "numpy"])

    def wrap(pair):
        t, kind = pair
        if kind == "list" or not isinstance(t, list):
            return t
        try:
            return torch.tensor(t, dtype=torch.float64) if kind == "tensor" else np.array(t, dtype=np.float64)
        except (TypeError, ValueError, RuntimeError):
            return t  # no such container for this table: passed as it is
    return st.tuples(table, container).map(wrap)


def entry_points():
    """Every public way head scores reach an allocation: make_cache, HeadScores, a record's from_json, plan."""
    from h2o.head_probes import HeadScores
    from tiny import tiny_model

    model = tiny_model("llama")

    def make(scores):
        h2o.make_cache(model, "retrieval_0.3_2+h2o_2_4_12", head_scores=scores)

    def make_other_rule(scores):  # a rule that ranks by no score still refuses malformed ones (never ignored)
        h2o.make_cache(model, "adakv+h2o_2_4_12", head_scores=scores)

    def record(scores):
        HeadScores.from_json({"format": "h2o-head-scores", "version": 1, "shape": [2, 2], "scores": scores})

    def plan(scores):
        HeadShare("retrieval", 0.3, 2).plan(h2o.parse("h2o_2_4_12"), 2, 2, scores)
    return model, {"make_cache": make, "make_cache(adakv)": make_other_rule, "HeadScores": HeadScores,
                   "HeadScores.from_json": record, "HeadShare.plan": plan}


_MODEL, _ENTRIES = entry_points()


@settings(max_examples=120, deadline=None)
@given(table=malformed_tables(), second=st.booleans(), entry=st.sampled_from(sorted(_ENTRIES)))
def test_every_head_score_entry_point_refuses_malformed_tables_before_anything_runs(table, second, entry):
    scores = {"retrieval": table} if not second else {"retrieval": GOOD, "induction": table}
    before = repr(scores)
    with pytest.raises((ValueError, TypeError), match="head score"):
        _ENTRIES[entry](scores)
    assert repr(scores) == before  # the caller's dict is not changed
    assert _MODEL.config._attn_implementation == "sdpa"  # the model was not touched


@pytest.mark.parametrize("scores", [[[0.1, 0.9]], torch.rand(2, 2), "retrieval", None, 3])
def test_head_scores_that_are_not_a_mapping_are_a_type_error(scores):
    with pytest.raises(TypeError, match="head scores must be"):
        HeadShare("retrieval", 0.3, 2).plan(h2o.parse("h2o_2_4_12"), 2, 2, scores if scores is not None else [])


@pytest.mark.parametrize("container", [lambda t: t, torch.tensor, np.array, lambda t: torch.tensor(t).double()])
def test_well_formed_tables_in_any_container_plan_the_same_heads(container):
    rule = h2o.parse("h2o_2_4_12")
    plans = [HeadShare("retrieval", 0.3, 2).plan(rule, 2, 2, {"retrieval": container(GOOD)}) for _ in range(2)]
    assert plans[0] == plans[1] == HeadShare("retrieval", 0.3, 2).plan(rule, 2, 2, {"retrieval": torch.tensor(GOOD)})
    chosen = [h for layer, p in enumerate(plans[0]) for g, b in p.groups if b == 24 for h in [(layer, x) for x in g]]
    assert chosen == [(0, 1)]  # 0.3 of 4 heads rounds to 1: the best, 0.9


@pytest.mark.parametrize("share, heads", [(0.9, 4), (0.75, 2), (0.99, 30)])
def test_a_share_that_rounds_to_every_head_is_a_clear_error(share, heads):
    with pytest.raises(ValueError, match="rounds to .*every head"):
        HeadShare("retrieval", share, 1.1).sizes(h2o.parse("h2o_2_4_12"), heads)


def test_headkv_gives_each_head_its_floor_and_the_rest_in_proportion_to_its_score():
    """HeadKV from its definition: floor = max(sinks + recent, ceil(0.25 x 64)) = 36, the pool N x (64 - 36)
    shared by retrieval score (no head near its cap of 4 x 64, every share whole); exactly N x 64 in all; equal
    shares where every score is 0."""
    rule = h2o.parse("h2o_4_32_64")
    table = torch.tensor([[0.0, 0.5], [0.25, 0.25], [1.0, 0.0]])  # exact in float32: the sum is 2
    plans = h2o.parse("headkv_0.25+h2o_4_32_64").plan(3, 2, {"retrieval": table})
    budgets = [[0] * 2 for _ in range(3)]
    for layer, plan in enumerate(plans):
        for heads, budget in plan.groups:
            for h in heads:
                budgets[layer][h] = budget
    pool = 6 * (64 - 36)
    expect = [[36 + int(pool * float(s) / 2.0) for s in row] for row in table]
    assert budgets == expect and sum(map(sum, budgets)) == 6 * 64
    assert min(map(min, budgets)) == 36
    zero = h2o.parse("headkv_0.25+h2o_4_32_64").plan(3, 2, {"retrieval": torch.zeros(3, 2)})
    assert all(plan.uniform and plan.groups[0][1] == 64 for plan in zero)
    assert rule.budget == 64
    with pytest.raises(ValueError, match="needs head scores"):
        h2o.parse("headkv+h2o_4_32_64").plan(3, 2)


def plan_budgets(plans, heads):
    """[layers][heads] budgets of a plan, each head in exactly one group of its layer."""
    out = []
    for plan in plans:
        row = [None] * heads
        for group, budget in plan.groups:
            for h in group:
                assert row[h] is None, plan
                row[h] = budget
        assert None not in row, plan
        out.append(row)
    return out


def water_level(weights, total, low, high):
    """The real shares water-filling gives (an oracle apart from `water_fill`'s rounds): the k heaviest weighted heads
    at high and the others at low + lam x weight, for the least k whose level lam leaves every other head under high;
    heads of weight 0 share equally what the weighted heads cannot hold."""
    pool, n, room = total - len(weights) * low, len(weights), high - low
    weighted = sorted((w for w in weights if w > 0), reverse=True)
    if not weighted:
        return [low + pool / n] * n
    if room * len(weighted) <= pool:
        zero = n - len(weighted)
        return [high if w > 0 else low + (pool - room * len(weighted)) / zero for w in weights]
    for k in range(len(weighted)):  # (shares as left x (w / rest): exact even for subnormal weights)
        left, rest = pool - k * room, math.fsum(weighted[k:])
        if left * (weighted[k] / rest) <= room * (1 + 1e-12):
            return [low + min(room, left * (w / rest)) for w in weights]
    raise AssertionError("unreachable")


scores_tables = st.integers(1, 6).flatmap(lambda layers: st.integers(1, 8).flatmap(lambda heads: st.lists(
    st.lists(st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1, width=32), st.floats(0, 2 ** -10, width=32)),
             min_size=heads, max_size=heads), min_size=layers, max_size=layers)))


@settings(max_examples=300, deadline=None)
@given(table=scores_tables, sinks=st.integers(0, 4), recent=st.integers(0, 8), extra=st.integers(1, 300),
       floor=st.floats(0, 1), factor=st.one_of(st.just(4.0), st.floats(1, 12)))
def test_headkv_budgets_are_water_filled_to_the_uniform_total_between_floor_and_cap(table, sinks, recent, extra,
                                                                                     floor, factor):
    """For any retrieval scores: the plan's budgets add up to exactly the uniform rule's total (heads x layers x
    budget), every head holds at least the floor and at most the cap, and each head's budget is its water-filled
    share (within the rounding to whole tokens). Before, shares were not capped (a head could be given more tokens
    than any prompt it sees: 2074 of a 1000-token prompt on SmolLM2) and were rounded down (the total fell short)."""
    rule = h2o.parse(f"h2o_{sinks}_{recent}_{sinks + recent + extra}")
    alloc = HeadKV(floor, factor)
    layers, heads = len(table), len(table[0])
    budgets = plan_budgets(alloc.plan(rule, layers, heads, {"retrieval": table}), heads)
    low = min(rule.budget, max(sinks + recent, math.ceil(floor * rule.budget)))
    cap = max(rule.budget, int(factor * rule.budget))
    assert alloc.sizes(rule) == (low, cap)
    flat = [b for row in budgets for b in row]
    assert sum(flat) == layers * heads * rule.budget
    assert all(low <= b <= cap for b in flat)
    weights = [float(torch.tensor(s, dtype=torch.float32)) for row in table for s in row]
    ideal = water_level(weights, layers * heads * rule.budget, low, cap)
    assert all(abs(b - x) < 1 + 1e-6 for b, x in zip(flat, ideal)), (flat, ideal)


def test_headkv_hands_what_a_head_cannot_hold_to_the_other_heads():
    """The SmolLM2 case (docs/gemma.md: headkv+h2o_mean held 9.07 MiB against the uniform rule's 11.84): its retrieval
    scores are concentrated, so score-proportional shares gave its two best heads 2074 and 1952 tokens of a
    1000-token prompt, and 17954 of the 18000 tokens in all. Water-filled under the cap (4 x 200), every head's share
    fits in the prompt and the plan holds exactly the uniform total."""
    g = torch.Generator().manual_seed(0)
    table = torch.rand(30, 3, generator=g) * 0.08
    for (layer, head), score in {(18, 2): 1.0, (17, 1): 0.94, (20, 2): 0.46, (23, 0): 0.45, (6, 0): 0.39,
                                 (21, 2): 0.24, (14, 0): 0.22, (20, 1): 0.16, (24, 1): 0.12}.items():
        table[layer, head] = score
    policy = h2o.parse("headkv+h2o_4_25_200")
    budgets = torch.tensor(plan_budgets(policy.plan(30, 3, {"retrieval": table}), 3))
    assert int(budgets.sum()) == 30 * 3 * 200 and int(budgets.max()) == 800 and int(budgets.min()) == 40
    assert budgets[18, 2] == budgets[17, 1] == 800  # capped; what they could not hold went to the others ...
    below = budgets.flatten() < 800
    plain = 40 + torch.floor(90 * 160 * table.flatten().double() / table.double().sum())  # the shares before
    assert int((plain > 1000).sum()) == 2 and int(plain.sum()) == 17954
    assert bool((budgets.flatten()[below] >= plain[below]).all())  # ... by score: every uncapped head gets more
    assert int((budgets.flatten()[below] - plain[below]).sum()) > 1000


def test_headkv_cache_keeps_as_many_tokens_as_the_uniform_rule_once_the_prompt_passes_the_cap():
    """End to end: one head scored, the others 0. Its proportional share (6 + 8 x 10 = 86 tokens) was more than the
    70-token prompt, so the cache held 70 + 7 x 6 = 112 tokens where the uniform rule holds 8 x 16 = 128. Now it holds
    the cap (64) and the other heads the rest: after the prefill every head keeps exactly its planned budget, within
    its bound (budget + buffer), and the cache as many tokens as the uniform rule."""
    from tiny import tiny_model, token_ids

    model = tiny_model("llama", layers=4)
    table = torch.zeros(4, 2)
    table[2, 1] = 1.0
    ids = token_ids(70)
    try:
        uniform = h2o.make_cache(model, "h2o_2_4_16", buffer=1)
        allocated = h2o.make_cache(model, "headkv+h2o_2_4_16", buffer=1, head_scores={"retrieval": table})
        with torch.no_grad():
            model(ids, past_key_values=uniform, use_cache=True)
            model(ids, past_key_values=allocated, use_cache=True)
    finally:
        h2o.restore(model)
    held = sum(map(sum, allocated.head_lengths()))
    assert held == sum(map(sum, uniform.head_lengths())) == 4 * 2 * 16  # before: 112
    planned = plan_budgets(h2o.parse("headkv+h2o_2_4_16").plan(4, 2, {"retrieval": table}), 2)
    assert planned[2][1] == 64 and allocated.head_lengths() == planned
    assert all(n <= b for lengths, bounds in zip(allocated.head_lengths(), allocated.head_bounds())
               for n, b in zip(lengths, bounds))


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.one_of(st.just(0.0), st.floats(0, 1)), min_size=1, max_size=40),
       low=st.integers(0, 50), room=st.integers(0, 400), data=st.data())
def test_water_fill_is_exact_and_bounded_or_refuses(weights, low, room, data):
    high = low + room
    n = len(weights)
    total = data.draw(st.integers(max(0, n * low - 5), n * high + 5))
    if not n * low <= total <= n * high:
        with pytest.raises(ValueError, match="cannot hold"):
            water_fill(weights, total, low, high)
        return
    out = water_fill(weights, total, low, high)
    assert sum(out) == total and all(low <= x <= high for x in out)
    ideal = water_level(weights, total, low, high)
    assert all(abs(x - y) < 1 + 1e-6 for x, y in zip(out, ideal)), (out, ideal)
    # a higher weight never gets fewer tokens than a lower one (but for the rounding's one token)
    assert all(out[i] >= out[j] - 1 for i in range(n) for j in range(n) if weights[i] > weights[j])
