"""The engine's llama.cpp types: one registry of codecs, and the per-tensor quantize-dequantize the plan applies.

A plan names a type per module (`weights: {ggml: Q4_K}`); a tensor whose rows the type cannot tile is stored in the
type llama.cpp falls back to (formats.ggml_row_type), so what the engine evaluates, counts and exports is what
llama-quantize would store for that tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink_core.compression.ggml import iq4, kquants_min, kquants_sym, legacy
from shrink_core.compression.ggml.codec import Codec
from shrink_core.formats import GGML_TYPES, WeightFormat, ggml_row_type
from shrink_core.perf.footprint import ROW_CHUNK_BYTES

CODECS: dict[str, Codec] = {**legacy.CODECS, **iq4.CODECS, **kquants_min.CODECS, **kquants_sym.CODECS}


@dataclass(frozen=True)
class GgmlState:
    """What the file stores for one quantized tensor: its type (after any fallback) and its block bytes."""

    requested: str  # the plan's type
    stored: str  # the type the row width allows: the requested one, its fallback, or F16
    data: torch.Tensor | None  # uint8 (rows, row bytes); None for F16 (the weight itself, rounded to float16)

    @property
    def fell_back(self) -> bool:
        return self.stored != self.requested

    def weight_format(self) -> WeightFormat:
        if self.stored == "F16":
            return WeightFormat(16, None, False)
        return WeightFormat(GGML_TYPES[self.stored], None, False, ggml=self.stored)


def codec(type_name: str) -> Codec:
    return CODECS[type_name]


def quantize_dequantize(weight: torch.Tensor, type_name: str, importance: torch.Tensor | None = None):
    """(weight as the file holds it, in the weight's dtype; GgmlState): llama.cpp's blocks for `type_name` (or its
    fallback), a block of rows at a time so a large embedding never needs a float32 copy of itself."""
    stored = ggml_row_type(type_name, weight.shape[1])
    if stored == "F16":
        return weight.half().to(weight.dtype), GgmlState(type_name, stored, None)
    chosen = CODECS[stored]
    rows = max(1, ROW_CHUNK_BYTES // (4 * weight.shape[1]))
    out = torch.empty_like(weight)
    data = torch.empty((weight.shape[0], chosen.row_bytes(weight.shape[1])), dtype=torch.uint8)
    weights = None if importance is None else importance.float().cpu()
    # the codecs are llama.cpp's reference code, written for the CPU: a GPU weight goes through them a block at a time
    for start in range(0, weight.shape[0], rows):
        part = chosen.quantize(weight[start:start + rows].float().cpu(), weights)
        data[start:start + rows] = part
        out[start:start + rows] = chosen.dequantize(part, weight.shape[1]).to(out.device, weight.dtype)
    return out, GgmlState(type_name, stored, data)
