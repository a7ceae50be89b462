"""The weight format, defined once: bits, group size and symmetry, with its exact stored bytes.

Pure arithmetic at the bottom of the layers, shared by the plan's resolved table, the engine's packed artifact, the
planner and the performance model, so the bytes a plan predicts are the bytes the artifact holds and the bytes the
roofline streams. (The method that chooses the codes, RTN or GPTQ, is the plan's `WeightSpec.method`; it does not
change the format.) Also the shapes structured pruning keeps, which the same byte counts need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

INT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = (16, 32)  # stored as float16 / float32 (32 = unchanged)
SCALE_BYTES = 2  # float16 scale per group
ZERO_BYTES = 1  # uint8 zero point per group (asymmetric only)
CHANNEL_ALIGN = 32  # kept MLP channels are a multiple of this (when the width allows), so groups still divide


def group_count(columns: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(columns / group_size)


def packed_weight_bytes(shape: tuple[int, int], bits: int, group_size: int | None, symmetric: bool) -> dict:
    """Exact bytes of the packed format: codes, float16 scales, uint8 zeros (asymmetric only); a partial last group
    stores one scale (and zero) like a full one."""
    rows, columns = shape
    groups = rows * group_count(columns, group_size)
    codes = rows * math.ceil(columns * bits / 8)
    scales = groups * SCALE_BYTES
    zeros = 0 if symmetric else groups * ZERO_BYTES
    return {"codes": codes, "scales": scales, "zeros": zeros, "total": codes + scales + zeros}


def weight_bytes(shape: tuple[int, ...], bits: int, group_size: int | None, symmetric: bool) -> int:
    """Stored bytes of a weight of `shape` in this format: float widths store every element, integer widths pack."""
    if bits in FLOAT_BITS:
        return math.prod(shape) * bits // 8
    return packed_weight_bytes((shape[0], math.prod(shape[1:])), bits, group_size, symmetric)["total"]


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: float (16/32 bits) or integer codes with per-group float16 scales (and uint8 zeros)."""

    bits: int
    group_size: int | None = 64  # None = one group per output channel
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in INT_BITS + FLOAT_BITS:
            raise ValueError(f"bits {self.bits} is not a supported weight width (2-8, 16 or 32).")

    @property
    def is_float(self) -> bool:
        return self.bits in FLOAT_BITS

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        return weight_bytes(shape, self.bits, self.group_size, self.symmetric)


def kept_channels(width: int, amount: float) -> int:
    kept = width - round(width * amount)
    if width % CHANNEL_ALIGN == 0 and kept >= CHANNEL_ALIGN:
        kept = max(CHANNEL_ALIGN, round(kept / CHANNEL_ALIGN) * CHANNEL_ALIGN)
    return max(1, min(width, kept))


def kept_heads_per_group(group: int, amount: float) -> int:
    return max(1, group - round(group * amount))
