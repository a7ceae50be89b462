"""Non-uniform codes for issue 17's 3-bit mark: a codebook per output row in place of a uniform grid per group.

Each row of a weight gets its own 2^bits values (float16), fitted by 1-D k-means weighted by the row's input
importance (diag H, the same weighting as the engine's clip search) to the weight GPTQ is about to quantize (for
gptq-seq: after its fit to the full-precision outputs). GPTQ then rounds each column to the nearest value of its
row's codebook and feeds the error forward as usual (`obs_compress(codebook=...)`). This is SqueezeLLM's format with
GPTQ's error feedback (GPTVQ's 1-D case). Stored: `bits` per weight for the codes plus 2^bits float16 values per row,
so 3 + 128 / in bits per weight (3.22 at 576 inputs, 3.08 at 1536): no scale or zero per group. Without groups a row
needs its values spread well, which a rotation first (`rotate: hadamard`) provides: a rotated row is close to
Gaussian, and k-means puts the levels where its mass is.

Bench only: it replaces the engine's `_compress_weight` for the calibrated methods while a plan runs, and records
the codebook in the QuantState's `scale` field (its `zero` zeros); nothing is exported.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from shrink_core.compression import apply as apply_module
from shrink_core.compression.obs import obs_compress, output_target
from shrink_core.plan.spec import HESSIAN_METHODS, SEQUENTIAL_METHODS


def fit_codebooks(weight: torch.Tensor, importance: torch.Tensor, levels: int, iterations: int = 25) -> torch.Tensor:
    """(out, levels) float16-valued codebooks: per-row 1-D k-means of weight (out, in), weighted by importance (in,),
    started from the row's weighted quantiles' midpoints (every level in use), stopped when no level moves."""
    weight, importance = weight.float(), importance.float().clamp_min(1e-12)
    ordered, order = weight.sort(dim=1)
    mass = importance[order].cumsum(1)
    mass = mass / mass[:, -1:]
    targets = (torch.arange(levels, dtype=torch.float32) + 0.5) / levels  # the centres of equal-mass bins
    centres = ordered.gather(1, torch.searchsorted(mass, targets.expand(weight.shape[0], -1).contiguous())
                             .clamp_max(weight.shape[1] - 1))
    for _ in range(iterations):
        assign = (weight.unsqueeze(-1) - centres.unsqueeze(1)).abs().argmin(-1)  # (out, in)
        total = torch.zeros_like(centres).scatter_add_(1, assign, weight * importance)
        count = torch.zeros_like(centres).scatter_add_(1, assign, importance.expand_as(weight))
        moved = torch.where(count > 0, total / count.clamp_min(1e-30), centres)
        if torch.equal(moved, centres):
            break
        centres = moved
    return centres.sort(dim=1).values.half().float()


def _lut_compress_weight(bits: int, original):
    levels = 2 ** bits

    def compress(weight, row, hessian, cross=None):
        spec = row.weights
        full = hessian if hessian is not None and hessian.dim() == 2 else None
        if spec is None or spec.is_float or spec.method not in HESSIAN_METHODS or full is None or row.prune:
            return original(weight, row, hessian, cross)
        if cross is not None and spec.method in SEQUENTIAL_METHODS:
            weight = output_target(weight, full, cross)
        codebook = fit_codebooks(weight, torch.diag(full), levels)
        new, _, _, _ = obs_compress(weight, full, codebook=codebook, act_order=True)
        state = apply_module.QuantState(bits, None, False, codebook, torch.zeros_like(codebook))
        return new, state, {}

    return compress


@contextmanager
def lut_engine(bits: int):
    """Within: the engine's calibrated methods quantize to per-row codebooks of 2^bits values."""
    original = apply_module._compress_weight
    apply_module._compress_weight = _lut_compress_weight(bits, original)
    try:
        yield
    finally:
        apply_module._compress_weight = original


def lut_bytes(shape: tuple[int, int], bits: int) -> int:
    """Codes packed at `bits` per weight plus 2^bits float16 values per row."""
    rows, columns = shape
    return (rows * columns * bits + 7) // 8 + rows * 2 ** bits * 2
