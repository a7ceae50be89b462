"""Exact checks of the column-by-column solver (GPTQ / SparseGPT) against the simple methods it must reduce to.

With H = I the inverse Hessian is diagonal, so no column's error reaches any other column: GPTQ is round-to-nearest,
bit for bit. With nothing to prune, SparseGPT is GPTQ, bit for bit. These hold for the solver's own arithmetic, not
within a tolerance.
"""
import itertools

import pytest
import torch

from shrink_core.compression.obs import obs_compress
from shrink_core.compression.primitives import dequantize, quantize, scale_zero

CASES = list(itertools.product((2, 4, 8), (32, None), (False, True)))


def _weight(seed: int, rows: int = 16, columns: int = 96) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randn(rows, columns) * 0.05


def _hessian(columns: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(4 * columns, columns) * torch.linspace(0.2, 2.0, columns)  # correlated, uneven feature energy
    x[:, 1::2] += x[:, ::2]
    return x.T @ x


@pytest.mark.parametrize("bits, group_size, symmetric", CASES)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn_bit_for_bit(bits, group_size, symmetric, act_order):
    weight = _weight(bits)
    new, scale, zero, keep = obs_compress(weight, torch.eye(96), bits=bits, group_size=group_size,
                                          symmetric=symmetric, act_order=act_order, block_size=32)
    rtn_scale, rtn_zero = scale_zero(weight, bits, group_size, symmetric)
    rtn_codes = quantize(weight, rtn_scale, rtn_zero, bits, group_size)
    assert torch.equal(scale, rtn_scale) and torch.equal(zero, rtn_zero)
    assert torch.equal(quantize(new, scale, zero, bits, group_size), rtn_codes)
    assert torch.equal(new, dequantize(rtn_codes, rtn_scale, rtn_zero, group_size))
    assert bool(keep.all())


@pytest.mark.parametrize("bits, group_size, symmetric", CASES)
def test_sparsegpt_at_zero_sparsity_is_gptq_bit_for_bit(bits, group_size, symmetric):
    weight, hessian = _weight(10 + bits), _hessian(96, bits)
    gptq = obs_compress(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, block_size=32)
    sparse = obs_compress(weight, hessian, bits=bits, group_size=group_size, symmetric=symmetric, block_size=32,
                          sparsity=0.0)
    assert bool(sparse[3].all()), "zero sparsity pruned weights"
    for a, b in zip(gptq, sparse):
        assert torch.equal(a, b)


def test_sparsegpt_at_zero_sparsity_without_bits_leaves_the_weight_alone():
    weight = _weight(3)
    new, scale, zero, keep = obs_compress(weight, _hessian(96, 3), sparsity=0.0, block_size=32)
    assert scale is None and zero is None and bool(keep.all())
    assert torch.equal(new, weight)


@pytest.mark.parametrize("sparsity", [0.25, 0.5, 0.7])
def test_sparsegpt_prunes_exactly_the_share_asked_per_block(sparsity):
    """Each block of 32 columns of a 16-row weight holds 512 weights: exactly round(512 * sparsity) become zero."""
    weight = _weight(5)
    new, _, _, keep = obs_compress(weight, _hessian(96, 5), sparsity=sparsity, block_size=32)
    for start in range(0, 96, 32):
        assert int((~keep[:, start:start + 32]).sum()) == round(512 * sparsity)
    assert torch.equal(new == 0, ~keep)


def test_in_place_permutation_is_index_select_and_its_inverse_restores_the_bits(monkeypatch):
    import shrink_core.compression.obs as obs
    import shrink_core.compression.primitives as primitives

    monkeypatch.setattr(primitives, "ROW_CHUNK_BYTES", 4 * 96 * 7)  # several blocks of rows, the last one partial
    hessian = _hessian(96, 7)
    # ten fixed points, then cycles of every length a random permutation draws
    order = torch.cat([torch.arange(10), 10 + torch.randperm(86, generator=torch.Generator().manual_seed(0))])
    permuted = obs._permute_(hessian.clone(), order)
    assert torch.equal(permuted, hessian[order][:, order])
    assert torch.equal(obs._permute_(permuted, torch.argsort(order)), hessian)


@pytest.mark.parametrize("act_order", [False, True])
def test_the_callers_hessian_comes_back_unchanged_and_gives_the_same_result_twice(act_order):
    """GPTQ permutes and damps the caller's float32 H in place to save a copy of it; it must put every bit back, dead
    features (a zero diagonal, set to 1 while factorizing) included, since another stack may read the same H."""
    weight, hessian = _weight(8), _hessian(96, 8)
    hessian[:, 3] = 0
    hessian[3, :] = 0  # a dead input feature
    before = hessian.clone()
    first = obs_compress(weight, hessian, bits=3, group_size=32, act_order=act_order, block_size=32)
    assert torch.equal(hessian, before)
    second = obs_compress(weight, hessian, bits=3, group_size=32, act_order=act_order, block_size=32)
    halved = obs_compress(weight, hessian.bfloat16().float(), bits=3, group_size=32, act_order=act_order, block_size=32)
    from_bf16 = obs_compress(weight, hessian.bfloat16(), bits=3, group_size=32, act_order=act_order, block_size=32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    for a, b in zip(halved, from_bf16):  # a H in another dtype is cast to a float32 copy of our own
        assert torch.equal(a, b)
