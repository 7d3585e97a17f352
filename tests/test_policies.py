"""The pure eviction function and policy parsing: Hypothesis properties, no model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o.policies import H2O, DEFAULT_SCORE, Full, Streaming, keep_indices, parse


@st.composite
def eviction_case(draw):
    """A random policy and a random cache state holding more than its budget."""
    sinks = draw(st.integers(0, 4))
    recent = draw(st.integers(0, 8))
    extra = draw(st.integers(0, 8))
    if draw(st.booleans()):
        policy = H2O(sinks, recent, sinks + recent + extra + 1, draw(st.sampled_from(["mean", "sum"])))
    else:
        policy = Streaming(sinks, recent + extra + 1)
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    length = policy.budget + draw(st.integers(1, 12))
    pads = torch.tensor([draw(st.integers(0, length - 1)) for _ in range(batch)])
    # Slots hold strictly increasing arrival times per head (some tokens already evicted).
    seen = length + draw(st.integers(0, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    times = torch.stack([
        torch.stack([torch.randperm(seen, generator=g)[:length].sort().values for _ in range(heads)])
        for _ in range(batch)
    ])
    # Left padding: padding tokens are the first `pads` arrivals; keep every head's padding slots
    # identical (as the cache guarantees) by forcing them to the same leading slots.
    for b in range(batch):
        times[b, :, : pads[b]] = torch.arange(pads[b])
        rest = torch.stack([torch.randperm(seen - pads[b].item(), generator=g)[: length - pads[b]].sort().values
                            for _ in range(heads)]) + pads[b]
        times[b, :, pads[b]:] = rest
    valid = torch.arange(length).unsqueeze(0) >= pads.unsqueeze(1)
    scores = torch.rand(batch, heads, length, generator=g)
    return policy, scores, times, valid, pads, seen


@settings(max_examples=300, deadline=None)
@given(eviction_case())
def test_keep_indices_invariants(case):
    policy, scores, times, valid, pads, seen = case
    buffer = policy.budget  # exercise rows that evict next to rows that only shed padding
    idx, kept = keep_indices(policy, scores, times, valid, pads, seen, buffer)
    batch, heads, length = times.shape
    real = valid.sum(-1)
    target = torch.where(real > policy.budget + buffer, policy.budget, real)
    assert idx.shape == (batch, heads, int(target.max())) and kept.shape == (batch, idx.shape[-1])
    assert ((idx >= 0) & (idx < length)).all()
    kept_times = times.gather(2, idx)
    for b in range(batch):
        # capacity: an evicting row keeps exactly the budget, any other row all its real tokens
        assert int(kept[b].sum()) == int(target[b])
        # unused slots come first (same layout in every head)
        assert (kept[b].int().diff() >= 0).all()
        for h in range(heads):
            slots = idx[b, h][kept[b]]
            # only tokens the row still had are kept; padding never takes a slot
            assert valid[b, slots].all()
            # order preservation: kept slots strictly increase, so tokens stay in temporal order
            assert (slots[1:] > slots[:-1]).all()
            kept_set = set(kept_times[b, h][kept[b]].tolist())
            real_times = times[b, h][valid[b]].tolist()
            # sink retention: the first `sinks` real tokens (by arrival) that are still cached
            assert {t for t in real_times if t - pads[b] < policy.sinks} <= kept_set
            # the recent window is always kept
            assert {t for t in real_times if t >= seen - policy.recent} <= kept_set


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(0, 6), st.integers(0, 6), st.integers(0, 10), st.integers(0, 2**31 - 1))
def test_h2o_keeps_heavy_hitters(sinks, recent, hitters, surplus, seed):
    """Outside sinks and the recent window, H2O keeps exactly the top-scored tokens of each head."""
    budget = sinks + recent + hitters
    policy = H2O(sinks, recent, budget, "sum")
    length = budget + surplus + 1
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, length, generator=g)
    times = torch.arange(length).expand(2, 3, length)
    idx, _ = keep_indices(policy, scores, times, torch.ones(2, length, dtype=torch.bool), torch.zeros(2, dtype=torch.long), length)
    middle = torch.arange(sinks, length - recent)
    for b in range(2):
        for h in range(3):
            expect = middle[scores[b, h, middle].topk(hitters).indices].tolist()
            assert set(expect) <= set(idx[b, h].tolist())


def test_mean_rule_normalises_by_queries_seen():
    # Token 1 received 3.0 from 6 queries (0.5 each), token 8 received 0.9 from 1 query.
    policy_sum, policy_mean = H2O(0, 0, 1, "sum"), H2O(0, 0, 1, "mean")
    times = torch.tensor([[[1, 8]]])
    scores = torch.tensor([[[3.0, 0.9]]])
    args = (times, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 9)
    assert keep_indices(policy_sum, scores, *args)[0].tolist() == [[[0]]]
    assert keep_indices(policy_mean, scores, *args)[0].tolist() == [[[1]]]


def test_parse_names():
    assert parse("full") == Full()
    assert parse("streaming_4_252") == Streaming(4, 252)
    assert parse("streaming_4_252").budget == 256
    assert parse("h2o_4_32_256") == H2O(4, 32, 256, DEFAULT_SCORE)
    assert parse("h2o_4_32_256_sum") == H2O(4, 32, 256, "sum")
    assert parse("h2o_4_32_256", score="sum").score == "sum"
    assert parse("h2o_4_32_256_mean").name == "h2o_4_32_256_mean"


@pytest.mark.parametrize("name, message", [
    ("h2o_200_100_256", "exceeds the budget"),
    ("streaming_0_0", "budget must be > 0"),
    ("h2o_0_0_0", "budget must be > 0"),
    ("h2o_4_32_256_max", "unknown H2O score rule"),
    ("lru_256", "unknown policy"),
    ("h2o_4_32", "unknown policy"),
    ("", "unknown policy"),
])
def test_parse_rejects_bad_names(name, message):
    with pytest.raises(ValueError, match=message):
        parse(name)


def test_parse_rejects_score_for_non_h2o_and_conflicts():
    with pytest.raises(ValueError, match="only applies to H2O"):
        parse("streaming_4_252", score="sum")
    with pytest.raises(ValueError, match="names score rule"):
        parse("h2o_4_32_256_mean", score="sum")


@pytest.mark.parametrize("name,said", [
    ("streeming", "did you mean 'streaming_<sinks>_<window>' (e.g. 'streaming_4_252')?"),
    ("kvzp_4_32_256", "did you mean 'kvzip_<sinks>_<recent>_<budget>[+<rule>]'"),
    ("recomended_256", "did you mean 'recommended_<budget>'"),
    ("retreival_0.1_4+h2o_4_32_256", "did you mean 'retrieval_0.1_4+h2o_4_32_256'?"),
    ("h2o_4_32_-5", "h2o names are h2o_<sinks>_<recent>_<budget>[_mean|_sum] (e.g. 'h2o_4_32_256')"),
    ("snapkv_256", "snapkv names are snapkv_<sinks>_<recent>_<budget>_<window>"),
    ("lru_256", "rules are a2sf, caote, full, h2o,"),
])
def test_an_unknown_policy_is_told_what_to_write_not_the_whole_grammar(name, said):
    """Issue 42: a misspelt or malformed name gets the grammar of the rule it starts with, or "did you mean" the
    closest names, in one short message (before: the whole grammar, ~1,000 characters)."""
    with pytest.raises(ValueError) as error:
        parse(name)
    message = str(error.value)
    assert message.startswith(f"unknown policy {name!r}") and said in message, message
    assert len(message) < 420, len(message)
