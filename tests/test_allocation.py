"""Allocations (h2o.policies.allocation): names, the budgets each plans, and Ada-KV's split as a pure function."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import h2o
from h2o.policies.allocation import AdaKV, Allocated, HeadShare, Pyramid, split_budget


@pytest.mark.parametrize("name, expect", [
    ("adakv+h2o_4_32_256", "adakv_0.2+h2o_4_32_256_mean"),
    ("retrieval+tova_4_32_256", "retrieval_0.1_4+tova_4_32_256"),
    ("induction_0.05_6+streaming_4_252", "induction_0.05_6+streaming_4_252"),
    ("pyramid_8+snapkv_4_32_256_16+tova", "pyramid_8+snapkv_4_32_256_16+tova"),
    ("headkv+h2o_4_32_256", "headkv_0.2+h2o_4_32_256_mean"), ("global+tova_4_32_256", "global_0.2+tova_4_32_256"),
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
    shared by retrieval score, rounded down; never more than N x 64 in all; equal shares where every score is 0."""
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
    assert budgets == expect and sum(map(sum, budgets)) <= 6 * 64
    assert min(map(min, budgets)) == 36
    zero = h2o.parse("headkv_0.25+h2o_4_32_64").plan(3, 2, {"retrieval": torch.zeros(3, 2)})
    assert all(plan.uniform and plan.groups[0][1] == 64 for plan in zero)
    assert rule.budget == 64
    with pytest.raises(ValueError, match="needs head scores"):
        h2o.parse("headkv+h2o_4_32_64").plan(3, 2)
