"""A weight format's exact size: the packed bytes of codes, scales and zeros, and the shapes structured pruning keeps.

Pure arithmetic, shared by the plan's resolved table, the engine's packed artifact and the planner, so the bytes a
plan predicts are the bytes the artifact holds.
"""
from __future__ import annotations

import math

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


def kept_channels(width: int, amount: float) -> int:
    kept = width - round(width * amount)
    if width % CHANNEL_ALIGN == 0 and kept >= CHANNEL_ALIGN:
        kept = max(CHANNEL_ALIGN, round(kept / CHANNEL_ALIGN) * CHANNEL_ALIGN)
    return max(1, min(width, kept))


def kept_heads_per_group(group: int, amount: float) -> int:
    return max(1, group - round(group * amount))
