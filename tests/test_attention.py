"""The one-pass attention (`fused_attention`) against SDPA and the two-pass definitions of the observations.

Output: torch's SDPA over the same mask (GQA heads repeated), within floating-point tolerance. Observations:
`attention_mass` and `last_query_row`, the scoring pass the stock-attention path runs, which define them.
"""

import pytest
import torch
import torch.nn.functional as F

from h2o.attention import attention_mass, fused_attention, last_query_row, value_weighted_mass

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def case(q, length, dtype, masked, seed=0, batch=2, hq=6, hkv=3, d=16):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, hq, q, d, generator=g).to(dtype)
    key = torch.randn(batch, hkv, length, d, generator=g).to(dtype)
    value = torch.randn(batch, hkv, length, d, generator=g).to(dtype)
    mask = None
    if masked:  # padding-like holes, causal over the new keys, each query sees itself
        causal = torch.ones(q, length, dtype=torch.bool).tril(diagonal=length - q)
        mask = (torch.rand(batch, 1, q, length, generator=g) > 0.3) & causal
        mask[..., length - q:] |= torch.eye(q, dtype=torch.bool)
    return query, key, value, mask


def sdpa_reference(query, key, value, mask, scaling):
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q = query.shape[-2]
    if mask is None:
        mask = torch.ones(q, key.shape[-2], dtype=torch.bool).tril(diagonal=key.shape[-2] - q)
    out = F.scaled_dot_product_attention(query.float(), k.float(), v.float(), attn_mask=mask, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("q, length, block", [(1, 40, 1 << 20), (12, 40, 1 << 20), (12, 40, 6 * 2 * 40 * 5),
                                              (30, 30, 6 * 2 * 30 * 4)])
def test_one_pass_equals_sdpa_and_the_scoring_pass(dtype, masked, q, length, block):
    query, key, value, mask = case(q, length, dtype, masked)
    scaling = 0.3
    valid = torch.ones(2, q, dtype=torch.bool)
    valid[1, : q // 3] = False  # some padding queries in row 1: they add no mass
    weights = torch.linspace(0.2, 1.0, q, dtype=torch.float64)
    out, mass, last, vmass = fused_attention(query, key, value, mask, scaling, valid,
                                             frozenset({"mass", "last", "vmass"}), weights, block_elements=block,
                                             with_vmass=True)
    assert out.shape == (2, q, 6, 16) and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), sdpa_reference(query, key, value, mask, scaling), **TOL[dtype])
    assert mass.dtype == last.dtype == torch.float32  # scores in float32 whatever the model dtype
    torch.testing.assert_close(mass, attention_mass(query, key, mask, scaling, valid, query_weights=weights),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last, last_query_row(query, key, mask, scaling), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(vmass, value_weighted_mass(query, key, value, mask, scaling, valid), rtol=1e-4,
                               atol=1e-5)


def test_one_pass_computes_only_what_is_asked():
    query, key, value, mask = case(5, 20, torch.float32, True)
    out, mass, last = fused_attention(query, key, value, mask, 0.25, None, frozenset({"last"}))
    assert mass is None and last is not None
    out, mass, last = fused_attention(query[:, :, -1:], key, value, mask[:, :, -1:], 0.25, None, frozenset({"mass"}))
    assert last is None and mass is not None


def test_score_blocks_are_sized_per_device(monkeypatch):
    """CPU: cache-sized 4 MiB blocks; CUDA: 1 GiB, so a 32k prompt with 32 heads keeps 256 queries a block."""
    from h2o.attention import SCORE_BLOCK_ELEMENTS, score_block_elements
    monkeypatch.delenv("H2O_SCORE_BLOCK_ELEMENTS", raising=False)
    assert score_block_elements("cpu") == SCORE_BLOCK_ELEMENTS["cpu"] == 1 << 20
    assert score_block_elements(torch.device("cuda", 0)) == SCORE_BLOCK_ELEMENTS["cuda"]
    assert SCORE_BLOCK_ELEMENTS["cuda"] // (32 * 32768) == 256
    monkeypatch.setenv("H2O_SCORE_BLOCK_ELEMENTS", "4096")
    assert score_block_elements("cuda") == 4096
    # the size only moves the block boundaries, never the result
    query, key, value, mask = case(12, 40, torch.float32, False)
    small = fused_attention(query, key, value, None, 0.3, None, frozenset({"mass"}))
    monkeypatch.setenv("H2O_SCORE_BLOCK_ELEMENTS", str(1 << 30))
    whole = fused_attention(query, key, value, None, 0.3, None, frozenset({"mass"}))
    torch.testing.assert_close(small[0], whole[0])
    torch.testing.assert_close(small[1], whole[1])


def test_attention_functions_take_dropout_positionally():
    """kvpress wraps every registered attention function and passes dropout as the sixth positional argument."""
    from h2o.attention import h2o_eager, h2o_sdpa
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = 2, True
    query, key, value, _ = case(4, 10, torch.float32, False)
    expect, _ = sdpa_attention_forward(module, query, key, value, None, 0.0, scaling=0.3)
    out, _ = h2o_sdpa(module, query, key, value, None, 0.0, scaling=0.3)  # not a compressed layer's: passes through
    torch.testing.assert_close(out, expect)
    assert h2o_eager.__code__.co_varnames[5] == "dropout"
