"""Pure quantization math: fake-quantize, quantize to integer codes, dequantize, bit-pack and their byte counts.

A weight is quantized along its input dimension in groups of `group_size` columns (None = one group per row, i.e.
per output channel). When `group_size` does not divide the columns, the last group is partial (ceil(in / group_size)
groups per row, e.g. 576 = 4 x 128 + 64 in SmolLM2): it is padded with zeros for the math and cropped after; zeros lie
inside every group's quantization range already (asymmetric ranges include 0, absmax ignores it), so padding changes
no scale or zero. Codes are unsigned integers in [0, 2**bits - 1]; the value is `(code - zero) * scale`.
Symmetric quantization uses the fixed zero 2**(bits - 1) (signed codes stored with an offset), so only the scale is
stored; asymmetric stores one integer zero per group. Scales are rounded to what the packed format stores (float16,
or the log8 grid: formats.SCALE_FORMATS), so what a quality run measures is exactly what the packed artifact holds.
"""
from __future__ import annotations

import torch

from shrink_core.formats import LOG_OFFSET_BITS, LOG_STEPS_PER_OCTAVE, SCALE_BYTES, ZERO_BYTES, group_count, packed_weight_bytes  # noqa: F401
from shrink_core.perf.footprint import ROW_CHUNK_BYTES  # float32 bytes of the rows quantized at once

WEIGHT_BITS = (2, 3, 4, 5, 6, 8)
MIN_SCALE = 2.0**-20  # keeps float16 scales non-zero for all-zero groups


def to_groups(weight: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """(out, in) -> (out, groups, group_size), the partial last group padded with zeros."""
    rows, columns = weight.shape
    size = columns if group_size is None else group_size
    groups = group_count(columns, group_size)
    if groups * size != columns:  # no copy in the usual, dividing case
        weight = torch.nn.functional.pad(weight, (0, groups * size - columns))  # (out, groups * size)
    return weight.reshape(rows, groups, size)


def from_groups(grouped: torch.Tensor, columns: int) -> torch.Tensor:
    """Inverse of `to_groups`: (out, groups, group_size) -> (out, in), padding cropped."""
    return grouped.reshape(grouped.shape[0], -1)[:, :columns]


def log_levels(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales (rows, groups) as the log8 format stores them: each row's top level (rows,) int16 and each group's
    offset below it (rows, groups) uint8, a level being round(log2(scale) * LOG_STEPS_PER_OCTAVE). A level more than
    255 below its row's top is raised to the lowest one (its group then uses less of the code range)."""
    level = torch.round(torch.log2(scale.float()) * LOG_STEPS_PER_OCTAVE)
    top = level.amax(-1)
    offset = (top.unsqueeze(-1) - level).clamp(max=2**LOG_OFFSET_BITS - 1)
    return top.to(torch.int16), offset.to(torch.uint8)


def from_log_levels(top: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """float32 scales (rows, groups) from the log8 format's stored levels."""
    return torch.exp2((top.float().unsqueeze(-1) - offset.float()) / LOG_STEPS_PER_OCTAVE)


def stored_scale(scale: torch.Tensor, scales: str = "fp16") -> torch.Tensor:
    """Scales (rows, groups) rounded to the values the packed format holds (float32 tensors of them)."""
    if scales == "log8":
        return from_log_levels(*log_levels(scale))
    return scale.half().float()


def scale_zero(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               clip: torch.Tensor | float = 1.0, scales: str = "fp16") -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest parameters; `clip` (scalar or (out, groups)) shrinks the range before rounding; the scale is
    rounded to the stored format first, and the zero chosen for the stored scale. `weight` holds whole rows (the
    log8 format's levels are relative to each row's largest)."""
    grouped = to_groups(weight.float(), group_size)  # (out, groups, size)
    if symmetric:
        top = 2 ** (bits - 1) - 1
        absmax = grouped.abs().amax(dim=-1) * clip  # (out, groups)
        scale = stored_scale((absmax / max(top, 1)).clamp(min=MIN_SCALE), scales)
        zero = torch.full_like(scale, 2 ** (bits - 1))
        return scale, zero
    low = grouped.amin(dim=-1).clamp(max=0) * clip  # (out, groups)
    high = grouped.amax(dim=-1).clamp(min=0) * clip
    scale = stored_scale(((high - low) / (2**bits - 1)).clamp(min=MIN_SCALE), scales)
    zero = torch.round(-low / scale).clamp(0, 2**bits - 1)
    return scale, zero


def quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
             group_size: int | None) -> torch.Tensor:
    """Integer codes (out, in) as uint8 for the given per-group scale and zero (out, groups)."""
    grouped = to_groups(weight.float(), group_size)  # (out, groups, size)
    codes = torch.round(grouped / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, 2**bits - 1)
    return from_groups(codes, weight.shape[1]).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int | None,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    grouped = to_groups(codes.float(), group_size)  # (out, groups, size)
    values = (grouped - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    return from_groups(values, codes.shape[1]).to(dtype)


def fake_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                  scales: str = "fp16") -> torch.Tensor:
    """Round-to-nearest quantize-dequantize in the weight's dtype."""
    scale, zero = scale_zero(weight, bits, group_size, symmetric, scales=scales)
    return dequantize(quantize(weight, scale, zero, bits, group_size), scale, zero, group_size, weight.dtype)


def chunk_rows(columns: int, element_size: int = 4) -> int:
    """Rows of a (rows, columns) matrix that fit in ROW_CHUNK_BYTES at the given element size (at least one)."""
    return max(1, ROW_CHUNK_BYTES // (element_size * columns))


def by_row_blocks(weight: torch.Tensor, fn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`fn` (float32 rows -> float32 rows) applied a block of rows at a time, written back in `dtype` (default: the
    weight's): a 128k x 4k embedding would otherwise need several float32 copies of itself (GBs) at once. Only for
    work that treats each row on its own (quantization groups lie along a row)."""
    rows = chunk_rows(weight.shape[1])
    out = torch.empty(weight.shape, dtype=dtype or weight.dtype, device=weight.device)
    for start in range(0, weight.shape[0], rows):
        out[start:start + rows] = fn(weight[start:start + rows].float()).to(out.dtype)
    return out


def rtn_by_rows(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool, scales: str = "fp16"):
    """Round-to-nearest quantize-dequantize, a block of rows at a time in float32: (weight in its own dtype, scale,
    zero). The same numbers as one pass over the whole matrix, without float32 copies of all of it."""
    found, zeros = [], []

    def rtn(part):
        scale, zero = scale_zero(part, bits, group_size, symmetric, scales=scales)
        found.append(scale)
        zeros.append(zero)
        return dequantize(quantize(part, scale, zero, bits, group_size), scale, zero, group_size)

    out = by_row_blocks(weight, rtn)
    return out, torch.cat(found), torch.cat(zeros)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack each row of codes (rows, cols) little-endian into uint8 (rows, ceil(cols * bits / 8))."""
    codes = codes.cpu()  # packed bytes go to a file
    rows, columns = codes.shape
    shifts = torch.arange(bits, dtype=torch.uint8)
    bit_planes = (codes.unsqueeze(-1) >> shifts) & 1  # (rows, cols, bits)
    stream = bit_planes.reshape(rows, columns * bits)
    padding = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, padding)).reshape(rows, -1, 8)  # (rows, bytes, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of `pack`: uint8 (rows, bytes) -> codes uint8 (rows, columns)."""
    rows = packed.shape[0]
    stream = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1  # (rows, bytes, 8)
    stream = stream.reshape(rows, -1)[:, : columns * bits].reshape(rows, columns, bits)
    weights = (1 << torch.arange(bits, dtype=torch.int32))
    return (stream.to(torch.int32) * weights).sum(dim=-1).to(torch.uint8)


def fake_quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Simulated dynamic per-token symmetric activation quantization, in x's dtype."""
    top = 2 ** (bits - 1) - 1
    scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp(min=1e-8)  # (..., 1)
    return (torch.round(x / scale).clamp(-top - 1, top) * scale).to(x.dtype)


def fake_quantize_groups(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Simulated asymmetric per-group quantization over the last dimension (KV-cache what-ifs)."""
    shape = x.shape
    grouped = x.float().reshape(*shape[:-1], shape[-1] // group_size, group_size)
    low, high = grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)
    scale = ((high - low) / (2**bits - 1)).clamp(min=1e-8)
    codes = torch.round((grouped - low) / scale).clamp(0, 2**bits - 1)
    return (codes * scale + low).reshape(shape).to(x.dtype)
