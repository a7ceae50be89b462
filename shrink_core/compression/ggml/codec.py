"""One llama.cpp weight type: its block geometry and its quantize / dequantize pair, on torch tensors.

A codec works on float32 rows whose width is a multiple of its block. `quantize` returns the exact bytes llama.cpp
stores for each block (so gguf-py, llama.cpp and this engine read the same numbers); `dequantize` turns them back
into float32 with the same float operations, in the same order, as gguf-py's reference `dequantize`, so the values
the engine evaluates are bit for bit those of the file it exports.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# weight (rows, cols) float32, importance (cols,) float32 or None -> uint8 (rows, cols // block * type_size)
Quantize = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# data uint8 (rows, cols // block * type_size), cols -> float32 (rows, cols)
Dequantize = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Codec:
    name: str  # llama.cpp's name: "Q4_K", "IQ4_XS", ...
    block: int  # weights per block: 32 (legacy, IQ4_NL) or 256 (K-quants, IQ4_XS)
    type_size: int  # bytes per block, scales included
    quantize: Quantize
    dequantize: Dequantize

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.type_size


def f16_bytes(values: torch.Tensor) -> torch.Tensor:
    """float -> float16, as two little-endian bytes each: (..., n) -> uint8 (..., 2n)."""
    return values.to(torch.float16).contiguous().view(torch.uint8)


def f16_from_bytes(data: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 2n) little-endian float16 -> float32 (..., n)."""
    return data.contiguous().view(torch.float16).float()
