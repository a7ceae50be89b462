"""The weight format, defined once: bits, group size, symmetry and how group scales are stored, with its exact bytes.

Pure arithmetic at the bottom of the layers, shared by the plan's resolved table, the engine's packed artifact, the
planner and the performance model, so the bytes a plan predicts are the bytes the artifact holds and the bytes the
roofline streams. (The method that chooses the codes, RTN or GPTQ, is the plan's `WeightSpec.method`; it does not
change the format.) Also the shapes structured pruning keeps, which the same byte counts need.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

INT_BITS = (2, 3, 4, 5, 6, 8)
FLOAT_BITS = (16, 32)  # stored as float16 / float32 (32 = unchanged)
SCALE_BYTES = 2  # float16 scale per group
ZERO_BYTES = 1  # uint8 zero point per group (asymmetric only)
# How group scales are stored: "fp16", one float16 a group (and a uint8 zero); "log8", an 8-bit offset a group on a
# log2 grid of LOG_STEPS_PER_OCTAVE steps an octave below a per-row int16 top level (relative rounding at most 1.1%,
# against float16's 0.05%), and the zero bit-packed in `bits` bits: 11 bits a group at 3 bits instead of 24, so group
# 32 fits in group 64's bytes (llama.cpp's K-quants make the same trade: 6-bit scales under a float16 one).
SCALE_FORMATS = ("fp16", "log8")
LOG_STEPS_PER_OCTAVE = 32
LOG_OFFSET_BITS = 8  # a group's level below its row's top one
LOG_TOP_BYTES = 2  # a row's top level, int16
CHANNEL_ALIGN = 32  # kept MLP channels are a multiple of this (when the width allows), so groups still divide


# llama.cpp's weight types a plan can choose, with the integer bits they are named by (their exact bits per weight, scales
# included, follow from GGML_QUANT_SIZES: weights per block, bytes per block).
GGML_TYPES = {"Q8_0": 8, "Q6_K": 6, "Q5_K": 5, "Q5_1": 5, "Q5_0": 5, "Q4_K": 4, "Q4_1": 4, "Q4_0": 4, "IQ4_XS": 4,
              "IQ4_NL": 4, "Q3_K": 3, "Q2_K": 2}
# What llama.cpp stores instead when a tensor's rows are not a multiple of a type's 256-wide super-block (its
# llama_tensor_get_type fallback); the 32-wide types need rows that are a multiple of 32 (else float16 is kept).
GGML_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0", "IQ4_XS": "IQ4_NL"}


def ggml_geometry(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a llama.cpp type, as gguf-py defines it."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def ggml_row_type(type_name: str, columns: int) -> str:
    """The type llama.cpp actually stores a tensor of this row width in: the type itself, its fallback, or F16."""
    for candidate in (type_name, GGML_FALLBACK.get(type_name)):
        if candidate is not None and columns % ggml_geometry(candidate)[0] == 0:
            return candidate
    return "F16"


def ggml_weight_bytes(shape: tuple[int, ...], type_name: str) -> int:
    """Exact bytes of a weight in a llama.cpp type (after the fallback its row width forces)."""
    rows, columns = shape[0], math.prod(shape[1:])
    block, size = ggml_geometry(ggml_row_type(type_name, columns))
    return rows * columns // block * size


def group_count(columns: int, group_size: int | None) -> int:
    return 1 if group_size is None else math.ceil(columns / group_size)


def packed_weight_bytes(shape: tuple[int, int], bits: int, group_size: int | None, symmetric: bool,
                        scales: str = "fp16") -> dict:
    """Exact bytes of the packed format: codes bit-packed per row; with fp16 scales a float16 scale and a uint8 zero
    (asymmetric only) per group, with log8 a uint8 offset per group and an int16 top per row, and the zeros bit-packed
    per row. A partial last group stores one scale (and zero) like a full one."""
    rows, columns = shape
    per_row = group_count(columns, group_size)
    codes = rows * math.ceil(columns * bits / 8)
    if scales == "log8":
        scale_bytes = rows * (per_row * LOG_OFFSET_BITS // 8 + LOG_TOP_BYTES)
        zeros = 0 if symmetric else rows * math.ceil(per_row * bits / 8)
    else:
        scale_bytes = rows * per_row * SCALE_BYTES
        zeros = 0 if symmetric else rows * per_row * ZERO_BYTES
    return {"codes": codes, "scales": scale_bytes, "zeros": zeros, "total": codes + scale_bytes + zeros}


def weight_bytes(shape: tuple[int, ...], bits: int, group_size: int | None, symmetric: bool,
                 ggml: str | None = None, scales: str = "fp16") -> int:
    """Stored bytes of a weight of `shape` in this format: float widths store every element, integer widths pack,
    llama.cpp types store their blocks."""
    if ggml is not None:
        return ggml_weight_bytes(shape, ggml)
    if bits in FLOAT_BITS:
        return math.prod(shape) * bits // 8
    return packed_weight_bytes((shape[0], math.prod(shape[1:])), bits, group_size, symmetric, scales)["total"]


@dataclass(frozen=True)
class WeightFormat:
    """How one weight is stored: float (16/32 bits), integer codes with per-group scales (and zeros) in `scales`'
    format, or a llama.cpp type's blocks (`ggml`; then bits is the type's nominal width, for the kernels' sake)."""

    bits: int
    group_size: int | None = 64  # None = one group per output channel
    symmetric: bool = False
    ggml: str | None = None
    scales: str = "fp16"  # SCALE_FORMATS

    def __post_init__(self):
        if self.bits not in INT_BITS + FLOAT_BITS:
            raise ValueError(f"bits {self.bits} is not a supported weight width (2-8, 16 or 32).")

    @property
    def is_float(self) -> bool:
        return self.bits in FLOAT_BITS

    def stored_bytes(self, shape: tuple[int, ...]) -> int:
        return weight_bytes(shape, self.bits, self.group_size, self.symmetric, self.ggml, self.scales)


def kept_channels(width: int, amount: float) -> int:
    kept = width - round(width * amount)
    if width % CHANNEL_ALIGN == 0 and kept >= CHANNEL_ALIGN:
        kept = max(CHANNEL_ALIGN, round(kept / CHANNEL_ALIGN) * CHANNEL_ALIGN)
    return max(1, min(width, kept))


def kept_heads_per_group(group: int, amount: float) -> int:
    return max(1, group - round(group * amount))
