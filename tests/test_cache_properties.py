"""CompressedLayer driven through random update sequences (no model): Hypothesis properties.

Each token's arrival index is encoded into its key and value, so after any number of evictions
we can check that keys, values, times and scores still describe the same tokens, slot by slot.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from h2o.cache import CompressedLayer, take_pending
from h2o.policies import H2O, Streaming

HEADS, DIM = 2, 3


@st.composite
def layer_run(draw):
    sinks, recent = draw(st.integers(0, 3)), draw(st.integers(0, 6))
    budget = sinks + recent + draw(st.integers(1, 8))
    if draw(st.booleans()):
        policy = H2O(sinks, recent, budget, draw(st.sampled_from(["mean", "sum"])))
    else:
        policy = Streaming(sinks, budget - sinks)
    buffer = draw(st.integers(0, 5))
    batch = draw(st.integers(1, 3))
    pads = [draw(st.integers(0, 4)) for _ in range(batch)]
    chunks = draw(st.lists(st.integers(1, 9), min_size=1, max_size=25))
    prefill = max(pads) + draw(st.integers(1, 10))
    return policy, buffer, pads, [prefill] + chunks, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=150, deadline=None)
@given(layer_run())
def test_layer_invariants(run):
    policy, buffer, pads, chunks, seed = run
    g = torch.Generator().manual_seed(seed)
    batch = len(pads)
    layer = CompressedLayer(policy, buffer, reindex=False)
    reference = [[{} for _ in range(HEADS)] for _ in range(batch)]  # time -> accumulated score
    seen = 0
    alone = [0] * batch  # tokens each row would keep if it ran alone
    limit = policy.budget + buffer
    for step, q in enumerate(chunks):
        arrival = torch.arange(seen, seen + q, dtype=torch.float32)
        payload = arrival.view(1, 1, q, 1).expand(batch, HEADS, q, DIM)
        keys, values = layer.update(payload.clone(), -payload.clone())
        assert take_pending(keys) is layer
        if step == 0:  # left padding lives in the prefill
            new_valid = torch.arange(q).unsqueeze(0) >= torch.tensor(pads).unsqueeze(1)
            layer.mark_padding(new_valid)
        length = keys.shape[-2]
        if layer.scores is not None:
            mass = torch.rand(batch, HEADS, length, generator=g)
            layer.add_scores(mass)
            for b in range(batch):
                for h in range(HEADS):
                    for slot, t in enumerate(layer.times[b, h].tolist()):
                        reference[b][h][t] = reference[b][h].get(t, 0.0) + mass[b, h, slot].item()
        seen += q
        evicted = layer.evict_if_needed()
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
        for b in range(batch):
            real_times = [t for t in range(pads[b], seen)]
            valid = layer.valid[b]
            for h in range(HEADS):
                row = times[b, h]
                kept_real = set(row[valid].tolist())
                assert all(t >= pads[b] for t in kept_real)  # valid slots are real tokens
                # sink retention and recent window
                assert set(real_times[: policy.sinks]) <= kept_real
                assert set(real_times[max(0, len(real_times) - policy.recent):]) <= kept_real
                # score alignment: each slot's score is what that token accumulated
                if layer.scores is not None:
                    expect = torch.tensor([reference[b][h][t] for t in row.tolist()])
                    torch.testing.assert_close(layer.scores[b, h], expect, rtol=1e-5, atol=1e-5)


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
    assert layer.evict_if_needed()
    kept = torch.tensor([0, 1, 8, 9, 10, 11])
    assert layer.times[0, 0].tolist() == kept.tolist()
    torch.testing.assert_close(layer.keys, at(base[:, :, kept], torch.arange(6)), rtol=1e-5, atol=1e-5)
    # the non-rotary part of each head is untouched
    assert torch.equal(layer.keys[..., rotary:], base[:, :, kept, rotary:])
