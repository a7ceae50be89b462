"""Quantization math: round trips over every bits x group x symmetry, packing, byte counts."""
import itertools
import math

import pytest
import torch

from shrink_core.compression.primitives import (
    WEIGHT_BITS,
    dequantize,
    fake_quantize,
    fake_quantize_activation,
    pack,
    packed_weight_bytes,
    quantize,
    scale_zero,
    unpack,
)

GROUPS = (32, 64, 128, None)


@pytest.mark.parametrize("bits, group_size, symmetric", list(itertools.product(WEIGHT_BITS, GROUPS, (True, False))))
def test_round_trip(bits, group_size, symmetric):
    torch.manual_seed(bits)
    weight = torch.randn(24, 256) * 0.05  # (out, in)
    scale, zero = scale_zero(weight, bits, group_size, symmetric)
    groups = 1 if group_size is None else 256 // group_size
    assert scale.shape == zero.shape == (24, groups)
    codes = quantize(weight, scale, zero, bits, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1
    restored = dequantize(codes, scale, zero, group_size)
    # every weight within one step of its group's grid (half a step plus the edge clamp), about a quarter on average
    step = scale.repeat_interleave(256 // groups, dim=1)
    error = (restored - weight).abs()
    assert (error <= step + 1e-7).all() and float((error / step).mean()) < 0.3
    # codes survive packing bit-exactly, and the packed size is what the accounting says
    packed = pack(codes, bits)
    assert torch.equal(unpack(packed, bits, 256), codes)
    expected = packed_weight_bytes((24, 256), bits, group_size, symmetric)
    assert packed.numel() == expected["codes"] == 24 * math.ceil(256 * bits / 8)
    assert expected["total"] == packed.numel() + scale.numel() * 2 + (0 if symmetric else zero.numel())
    # quantizing the dequantized weight again is a fixed point
    assert torch.equal(quantize(restored, scale, zero, bits, group_size), codes)
    assert torch.equal(fake_quantize(weight, bits, group_size, symmetric), restored)


@pytest.mark.parametrize("bits, symmetric", [(4, False), (3, False), (4, True), (8, True)])
def test_partial_last_group(bits, symmetric):
    """K=96, g=64: one full group and one of 32; the partial group quantizes as a group of its own columns."""
    torch.manual_seed(bits)
    weight = torch.randn(8, 96) * 0.05
    weight[:, 64:] *= 10  # a wider range in the partial group: it must get its own scale
    scale, zero = scale_zero(weight, bits, 64, symmetric)
    assert scale.shape == zero.shape == (8, 2)
    alone_scale, alone_zero = scale_zero(weight[:, 64:], bits, None, symmetric)  # the last 32 columns by themselves
    assert torch.equal(scale[:, 1:], alone_scale) and torch.equal(zero[:, 1:], alone_zero)
    codes = quantize(weight, scale, zero, bits, 64)
    assert codes.shape == (8, 96)
    restored = dequantize(codes, scale, zero, 64)
    assert restored.shape == (8, 96)
    assert torch.equal(restored[:, 64:], fake_quantize(weight[:, 64:], bits, None, symmetric))
    assert torch.equal(restored[:, :64], fake_quantize(weight[:, :64], bits, None, symmetric))
    assert torch.equal(unpack(pack(codes, bits), bits, 96), codes)
    expected = packed_weight_bytes((8, 96), bits, 64, symmetric)
    assert expected["scales"] == 8 * 2 * 2 and expected["zeros"] == (0 if symmetric else 8 * 2)
    assert expected["codes"] == pack(codes, bits).numel() == 8 * math.ceil(96 * bits / 8)


def test_group_larger_than_the_row_is_one_partial_group():
    torch.manual_seed(0)
    weight = torch.randn(4, 96)
    assert torch.equal(fake_quantize(weight, 4, 128, False), fake_quantize(weight, 4, None, False))
    assert packed_weight_bytes((4, 96), 4, 128, False) == packed_weight_bytes((4, 96), 4, None, False)


def test_more_bits_less_error():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    errors = [float((fake_quantize(weight, b, 64, False) - weight).pow(2).mean()) for b in WEIGHT_BITS]
    assert errors == sorted(errors, reverse=True)


def test_pack_odd_widths_pad_each_row():
    codes = torch.tensor([[7, 0, 5], [1, 2, 3]], dtype=torch.uint8)
    packed = pack(codes, 3)  # 9 bits -> 2 bytes per row
    assert packed.shape == (2, 2)
    assert packed[0, 0] == 0b01000111 and packed[0, 1] == 0b1  # little-endian bit stream: 111 000 101
    assert torch.equal(unpack(packed, 3, 3), codes)


def test_zero_group_and_activation_simulation():
    weight = torch.zeros(4, 64)
    assert torch.equal(fake_quantize(weight, 4, 32, False), weight)
    x = torch.randn(2, 5, 64)
    y = fake_quantize_activation(x, 8)
    assert y.shape == x.shape and 0 < float((y - x).abs().max()) <= float(x.abs().max()) / 127


def test_rtn_by_blocks_of_rows_equals_one_pass_over_the_whole_matrix(monkeypatch):
    from shrink_core.compression import primitives

    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    scale, zero = primitives.scale_zero(weight.float(), 4, 64, False)
    whole = primitives.dequantize(primitives.quantize(weight.float(), scale, zero, 4, 64), scale, zero, 64)
    monkeypatch.setattr(primitives, "ROW_CHUNK_BYTES", 4 * 128 * 7)  # 7 rows at a time: 43 blocks
    out, scales, zeros = primitives.rtn_by_rows(weight, 4, 64, False)
    assert out.dtype == torch.bfloat16 and torch.equal(out, whole.to(torch.bfloat16))
    assert torch.equal(scales, scale) and torch.equal(zeros, zero)
