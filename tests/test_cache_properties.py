"""CompressedLayer driven through random update sequences (no model): Hypothesis properties, for every
registered policy.

Each token's arrival index is encoded into its key and value, so after any number of evictions
we can check that keys, values, times and the policy's state still describe the same tokens, slot
by slot. State alignment is checked against a twin layer of the same policy that never evicts and
receives the same observations at the same tokens: the policy's update is slot-wise (the contract
in `h2o.policies.base`), so each kept slot must hold what its token holds in the twin.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o.cache import CompressedLayer, UnobservedError, take_pending
from h2o.policies import SCORE_RULES, Observation, Streaming, parse, registered

HEADS, DIM = 2, 3


class Composed:
    """SnapKV then a decode rule (snapkv_..+<rule>): sized like a registered class, for the same properties."""

    has_score = False

    def __init__(self, rule):
        self.rule, self.__name__ = rule, f"snapkv+{rule}"

    def sized(self, sinks, recent, budget):
        return parse(f"snapkv_{sinks}_{recent}_{budget}_{min(3, budget)}+{self.rule}")


class Surrogated:
    """A rule that ranks by a fitted surrogate (kvzap): sized like its class, with a random surrogate of 3 heads of
    DIM dims bound (the rule's mechanics; `h2o.score_surrogate` fits real ones)."""

    has_score = False

    def __init__(self, cls):
        from tiny import random_surrogate

        self.cls, self.NAME, self.__name__ = cls, cls.NAME, cls.__name__
        self.surrogate = random_surrogate(1, 3, DIM, 2)

    def __getattr__(self, name):  # the class's other attributes (observes, replays, ...)
        return getattr(self.cls, name)

    def sized(self, sinks, recent, budget):
        return self.cls.sized(sinks, recent, budget).with_surrogate(self.surrogate)


EVICTING = [Surrogated(cls) if getattr(cls, "needs_surrogate", False) else cls
            for cls in registered().values() if cls.evicts] + [Composed("tova"), Composed("h2o_mean"),
                                                                 Composed("vatp_sum")]


@st.composite
def layer_run(draw, cls):
    sinks, recent = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    budget = sinks + recent + draw(st.integers(1, 8))
    policy = cls.sized(sinks, recent, budget)
    if cls.has_score:
        policy = type(policy).from_name(policy.name.rsplit("_", 1)[0], draw(st.sampled_from(SCORE_RULES)))
    buffer = draw(st.integers(0, 5))
    batch = draw(st.integers(1, 3))
    pads = [draw(st.integers(0, 4)) for _ in range(batch)]
    chunks = draw(st.lists(st.integers(1, 9), min_size=1, max_size=25))
    prefill = max(pads) + draw(st.integers(1, 10))
    return policy, buffer, pads, [prefill] + chunks, draw(st.integers(0, 2**31 - 1))


def random_observation(policy, batch, length, g, queries=1, heads=HEADS) -> Observation:
    rand = lambda: torch.rand(batch, heads, length, generator=g)
    return Observation(queries=queries, mass=rand() if "mass" in policy.observes else None,
                       last=rand().softmax(-1) if "last" in policy.observes else None,
                       count=torch.randint(0, 5, (batch, 1, length), generator=g).float()
                       if "count" in policy.observes else None,
                       vmass=rand() if "vmass" in policy.observes else None)


def at_tokens(obs: Observation, times: torch.Tensor, total: int) -> Observation:
    """The same observation laid out over a never-evicting twin's slots (slot = arrival time)."""
    def spread(x):
        if x is None:
            return None
        out = torch.zeros(*x.shape[:2], total)
        out.scatter_(2, times[:, : x.shape[1]].expand(-1, x.shape[1], -1), x)
        return out
    return Observation(queries=obs.queries, mass=spread(obs.mass), last=spread(obs.last), count=spread(obs.count),
                       vmass=spread(obs.vmass))


@pytest.mark.parametrize("cls", EVICTING, ids=[getattr(c, "NAME", c.__name__) for c in EVICTING])
def test_layer_invariants(cls):
    @settings(max_examples=60, deadline=None)
    @given(layer_run(cls))
    def check(run):
        policy, buffer, pads, chunks, seed = run
        g = torch.Generator().manual_seed(seed)
        batch = len(pads)
        layer = CompressedLayer(policy, buffer, reindex=False)
        twin = CompressedLayer(policy, 10**9, reindex=False)  # never evicts: slot = arrival time
        seen = 0
        alone = [0] * batch  # tokens each row would keep if it ran alone
        limit = policy.budget + buffer
        for step, q in enumerate(chunks):
            arrival = torch.arange(seen, seen + q, dtype=torch.float32)
            payload = arrival.view(1, 1, q, 1).expand(batch, HEADS, q, DIM)
            keys, values = layer.update(payload.clone(), -payload.clone())
            assert take_pending(keys) is layer
            twin.update(payload.clone(), -payload.clone())
            if step == 0:  # left padding lives in the prefill
                new_valid = torch.arange(q).unsqueeze(0) >= torch.tensor(pads).unsqueeze(1)
                layer.mark_padding(new_valid)
            length = keys.shape[-2]
            obs = random_observation(policy, batch, length, g, q)
            twin.observe(at_tokens(obs, layer.times, seen + q))
            seen += q
            evicted = layer.observe(obs)
            kept = layer.keys.shape[-2]
            for b in range(batch):
                alone[b] += q - (pads[b] if step == 0 else 0)
                alone[b] = policy.budget if alone[b] > limit else alone[b]
            # capacity bounds: never above budget + buffer slots after a step; each row keeps exactly
            # what it would keep alone (the budget right after its own eviction)
            assert kept <= limit and evicted == (length > limit)
            assert layer.valid.sum(-1).tolist() == alone
            times = layer.times
            # order preservation: the kept tokens' arrival times strictly increase along the slots,
            # and a row's unused slots (padding, masked leftovers) come before them
            for b in range(batch):
                valid = layer.valid[b]
                assert (valid.int().diff() >= 0).all()
                assert (times[b][:, valid].diff(dim=-1) > 0).all()
            # K/V alignment: every slot's key and value carry the arrival time recorded for that slot
            assert torch.equal(layer.keys[..., 0], times.float())
            assert torch.equal(layer.values[..., 0], -times.float())
            assert layer.get_seq_length() == seen
            # state alignment: each kept slot holds what its token holds in the never-evicting twin
            assert set(layer.state) == set(policy.state)
            for name, tensor in layer.state.items():
                assert tensor.dtype == torch.float32 and tensor.shape == times.shape
                expect = twin.state[name].gather(2, times)
                valid = layer.valid[:, None, :].expand_as(times)
                torch.testing.assert_close(tensor[valid], expect[valid], rtol=1e-5, atol=1e-5)
            for b in range(batch):
                real_times = [t for t in range(pads[b], seen)]
                valid = layer.valid[b]
                for h in range(HEADS):
                    kept_real = set(times[b, h][valid].tolist())
                    assert all(t >= pads[b] for t in kept_real)  # valid slots are real tokens
                    # sink retention and recent window
                    assert set(real_times[: policy.sinks]) <= kept_real
                    assert set(real_times[max(0, len(real_times) - policy.recent):]) <= kept_real

    check()


def test_an_update_that_attention_never_observed_is_an_error():
    layer = CompressedLayer(Streaming(1, 2), buffer=0, reindex=False)
    x = torch.zeros(1, 1, 4, 2)
    layer.update(x, x)
    with pytest.raises(UnobservedError, match="never saw the previous ones"):
        layer.update(x[:, :, :1], x[:, :, :1])


def test_reindex_eviction_rerotates_keys_to_their_new_slots():
    """After eviction in reindex mode a key equals the same key rotated at its new slot."""
    from h2o import rope
    torch.manual_seed(0)
    dim, rotary = 8, 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    base = torch.randn(1, 1, 12, dim)
    at = lambda x, pos: rope.rotate(x, torch.as_tensor(pos).float().view(1, 1, -1), inv_freq, rotary)
    layer = CompressedLayer(Streaming(2, 4), buffer=0, reindex=True, rope=(inv_freq, rotary))
    layer.update(at(base, torch.arange(12)), base.clone())
    take_pending(layer.keys)
    assert layer.observe(Observation())
    kept = torch.tensor([0, 1, 8, 9, 10, 11])
    assert layer.times[0, 0].tolist() == kept.tolist()
    torch.testing.assert_close(layer.keys, at(base[:, :, kept], torch.arange(6)), rtol=1e-5, atol=1e-5)
    # the non-rotary part of each head is untouched
    assert torch.equal(layer.keys[..., rotary:], base[:, :, kept, rotary:])


# --- head groups: heads holding different numbers of tokens (allocations) ----------------------------

from h2o.cache import HeadGroupLayer  # noqa: E402
from h2o.policies.allocation import LayerPlan  # noqa: E402

GROUP_HEADS = 3


@st.composite
def group_run(draw, cls):
    policy, buffer, pads, chunks, seed = draw(layer_run(cls))
    joint = draw(st.booleans())
    if joint:  # Ada-KV: one head a group, the layer's budget split at every eviction, a floor per head
        floor = policy.sinks + policy.recent + draw(st.integers(0, 2))
        plan = LayerPlan(tuple(((h,), policy.budget) for h in range(GROUP_HEADS)), joint=True,
                         total=GROUP_HEADS * max(policy.budget, floor), floor=floor)
    else:  # head groups with their own budgets (retrieval heads; the others smaller)
        big = policy.budget + draw(st.integers(1, 10))
        plan = LayerPlan((((1,), big), ((0, 2), policy.budget)))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return policy, buffer, pads, chunks, seed, plan, dtype


@pytest.mark.parametrize("cls", EVICTING, ids=[getattr(c, "NAME", c.__name__) for c in EVICTING])
def test_head_group_invariants(cls):
    """Every head of a `HeadGroupLayer` holds its own bound after every forward (a joint layer: its heads' total
    too), in order, keys/values/state aligned with their tokens (against never-evicting twins), sinks and recent
    kept, padding rows judged alone; float32 and bfloat16 keys and values."""
    @settings(max_examples=40, deadline=None)
    @given(group_run(cls))
    def check(run):
        policy, buffer, pads, chunks, seed, plan, dtype = run
        g = torch.Generator().manual_seed(seed)
        batch = len(pads)
        layer = HeadGroupLayer(plan, policy, buffer, reindex=False)
        twins = [CompressedLayer(sub.policy, 10**9, reindex=False) for sub in layer.sublayers]
        seen = 0
        for step, q in enumerate(chunks):
            arrival = torch.arange(seen, seen + q, dtype=torch.float32)
            payload = arrival.view(1, 1, q, 1).expand(batch, GROUP_HEADS, q, DIM).to(dtype)
            keys, _ = layer.update(payload.clone(), -payload.clone())
            assert take_pending(keys) is layer
            for (kv, _), sub, twin in zip(layer.index(torch.device("cpu")), layer.sublayers, twins):
                twin.update(payload[:, kv].clone(), -payload[:, kv].clone())
                if step == 0:
                    new_valid = torch.arange(q).unsqueeze(0) >= torch.tensor(pads).unsqueeze(1)
                    sub.mark_padding(new_valid)
                obs = random_observation(policy, batch, sub.keys.shape[-2], g, q, heads=len(kv))
                twin.observe(at_tokens(obs, sub.times, seen + q))
                sub.observe(obs)
            seen += q
            layer.observed()
            lengths, bounds = layer.head_lengths(), layer.head_bounds()
            assert all(n <= b for n, b in zip(lengths, bounds)), (lengths, bounds)  # each head's own bound
            real = sum(sub.valid.sum(-1) for sub in layer.sublayers)  # [B] real tokens over the heads
            if plan.joint:
                assert (real <= plan.total + GROUP_HEADS * buffer).all()
            for sub, twin in zip(layer.sublayers, twins):
                times, valid = sub.times, sub.valid
                assert torch.equal(sub.keys[..., 0].float(), times.float())  # K/V alignment
                assert torch.equal(sub.values[..., 0].float(), -times.float())
                for name, tensor in sub.state.items():  # state alignment with the never-evicting twin
                    expect = twin.state[name].gather(2, times)
                    mask = valid[:, None, :].expand_as(times)
                    torch.testing.assert_close(tensor[mask], expect[mask], rtol=1e-5, atol=1e-5)
                for b in range(batch):
                    assert (valid[b].int().diff() >= 0).all()  # unused slots first, then tokens in order
                    assert (times[b][:, valid[b]].diff(dim=-1) > 0).all()
                    real_times = list(range(pads[b], seen))
                    for h in range(times.shape[1]):
                        kept = set(times[b, h][valid[b]].tolist())
                        assert all(t >= pads[b] for t in kept)
                        assert set(real_times[: policy.sinks]) <= kept
                        assert set(real_times[max(0, len(real_times) - policy.recent):]) <= kept
            assert layer.get_seq_length() == seen

    check()


# --- a budget shared across layers (global_<floor>): every layer evicted together after a forward -----------------

from h2o.rows_layer import RowsLayer  # noqa: E402
from h2o.shared_budget import SharedBudget  # noqa: E402

SHARED_LAYERS = 2


@pytest.mark.parametrize("cls", EVICTING, ids=[getattr(c, "NAME", c.__name__) for c in EVICTING])
def test_shared_budget_invariants(cls):
    """Layers sharing one budget (`SharedBudget`, one joint split over every layer's heads after each forward): no
    layer evicts before the last one is observed; after every forward each row holds at most the shared total +
    the buffers over all layers and heads, each head its own bound; in order, keys/values/state aligned with their
    tokens (against never-evicting twins), sinks and recent kept, padded rows judged alone."""
    @settings(max_examples=30, deadline=None)
    @given(layer_run(cls), st.integers(0, 2))
    def check(run, extra_floor):
        policy, buffer, pads, chunks, seed = run
        g = torch.Generator().manual_seed(seed)
        batch = len(pads)
        floor = policy.sinks + policy.recent + extra_floor
        per_layer = GROUP_HEADS * max(policy.budget, floor)
        plan = LayerPlan(tuple(((h,), policy.budget) for h in range(GROUP_HEADS)), joint=True, total=per_layer,
                         floor=floor)
        shared = SharedBudget(SHARED_LAYERS * per_layer, floor, buffer)
        layers = [RowsLayer(plan, policy, buffer, reindex=False) for _ in range(SHARED_LAYERS)]
        for layer in layers:
            shared.join(layer)
        twins = {}
        seen = 0
        for step, q in enumerate(chunks):
            arrival = torch.arange(seen, seen + q, dtype=torch.float32)
            payload = arrival.view(1, 1, q, 1).expand(batch, GROUP_HEADS, q, DIM).contiguous()
            for li, layer in enumerate(layers):
                keys, _ = layer.update(payload.clone(), -payload.clone())
                assert take_pending(keys) is layer
                before = [sub.length for sub in layer.sublayers]
                for b, row in enumerate(layer.rows):
                    for h, sub in enumerate(row.sublayers):
                        twin = twins.setdefault((li, b, h), CompressedLayer(sub.policy, 10**9, reindex=False))
                        twin.update(payload[b:b + 1, h:h + 1].clone(), -payload[b:b + 1, h:h + 1].clone())
                        if step == 0:
                            sub.mark_padding(torch.arange(q).unsqueeze(0) >= pads[b])
                        obs = random_observation(policy, 1, sub.keys.shape[-2], g, q, heads=1)
                        twin.observe(at_tokens(obs, sub.times, seen + q))
                        sub.observe(obs)
                layer.observed()
                if li < SHARED_LAYERS - 1:  # not the last layer: nothing evicted yet
                    assert [sub.length for sub in layer.sublayers] == before
            seen += q
            for b in range(batch):
                heads = [sub for layer in layers for sub in layer.rows[b].sublayers]
                real = sum(int(sub.valid.sum()) for sub in heads)
                assert real <= shared.total + len(heads) * buffer
                for sub in heads:
                    assert sub.length <= sub.budget + sub.room
            for (li, b, h), twin in twins.items():
                sub = layers[li].rows[b].sublayers[h]
                times, valid = sub.times, sub.valid
                assert torch.equal(sub.keys[..., 0], times.float())  # K/V alignment
                assert torch.equal(sub.values[..., 0], -times.float())
                for name, tensor in sub.state.items():
                    expect = twin.state[name].gather(2, times)
                    mask = valid[:, None, :].expand_as(times)
                    torch.testing.assert_close(tensor[mask], expect[mask], rtol=1e-5, atol=1e-5)
                assert (valid[0].int().diff() >= 0).all()
                assert (times[0][:, valid[0]].diff(dim=-1) > 0).all()
                kept = set(times[0, 0][valid[0]].tolist())
                real_times = list(range(pads[b], seen))
                assert all(t >= pads[b] for t in kept)
                assert set(real_times[: policy.sinks]) <= kept
                assert set(real_times[max(0, len(real_times) - policy.recent):]) <= kept
                assert len(kept) >= min(floor, len(real_times))  # every head its floor (or all its real tokens)
            assert all(layer.get_seq_length() == seen for layer in layers)

    check()
