"""A smaller group for the same bytes, for issue 17's 3-bit mark: 8-bit log-coded scales and `bits`-bit zeros.

Today's format spends 24 bits per group on metadata: a float16 scale and an 8-bit zero, though an asymmetric zero
lies in [0, 2**bits - 1] and needs only `bits` bits (3 at 3 bits). This format stores each group's scale as an
8-bit offset on a log2 grid of 32 steps an octave (relative rounding at most 1.1%, against float16's 0.05%) below a
per-row 16-bit top level, and the zero in `bits` bits. At 3 bits and group 32 that is 3 + 11/32 bits per weight plus
16 bits a row: 3.372 at 576 inputs, 3.354 at 1536, within the 3.375 of today's w3 g64, with twice the groups.
(llama.cpp's K-quants make the same trade: 6-bit scales under a float16 super-block scale.)

Bench only: while `compact_engine()` is active the engine's scale choice (`scale_zero`, which the clip search, GPTQ's
static groups and RTN all call) and the end-to-end tuning's forward (`TunedScales.scale`) round scales to the grid
in place of float16, so every method and the tuning see and train exactly the stored scales; nothing is exported.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

from shrink_core.compression import apply as apply_module
from shrink_core.compression import obs as obs_module
from shrink_core.compression import primitives
from shrink_core.compression import tune as tune_module
from shrink_core.compression.primitives import MIN_SCALE, to_groups

STEPS_PER_OCTAVE = 32
SCALE_BITS = 8  # the offset below the row's top level
ROW_BITS = 16  # the row's top level


def to_grid(scale: torch.Tensor) -> torch.Tensor:
    """Scales (rows, groups) rounded to the log2 grid, each row's levels within 2**SCALE_BITS of its top one (a
    scale further below is raised to the lowest level; its group's codes then use less of the range)."""
    level = torch.round(torch.log2(scale.float()) * STEPS_PER_OCTAVE)
    level = torch.maximum(level, level.amax(-1, keepdim=True) - (2**SCALE_BITS - 1))
    return torch.exp2(level / STEPS_PER_OCTAVE)


def scale_zero(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
               clip: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """primitives.scale_zero with the scale on the log grid instead of float16 (the same ranges and clip)."""
    grouped = to_groups(weight.float(), group_size)  # (out, groups, size)
    if symmetric:
        absmax = grouped.abs().amax(dim=-1) * clip
        scale = to_grid((absmax / max(2 ** (bits - 1) - 1, 1)).clamp(min=MIN_SCALE))
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    low = grouped.amin(dim=-1).clamp(max=0) * clip
    high = grouped.amax(dim=-1).clamp(min=0) * clip
    scale = to_grid(((high - low) / (2**bits - 1)).clamp(min=MIN_SCALE))
    return scale, torch.round(-low / scale).clamp(0, 2**bits - 1)


def _tuned_scale(self) -> torch.Tensor:
    scale = self.scale0 * torch.exp(self.theta)
    return scale + (to_grid(scale) - scale).detach()  # the stored grid forward, the gradient straight through


@contextmanager
def compact_engine():
    """Within: the engine's integer formats store log-grid scales (every caller of scale_zero, and the tuning)."""
    patched = [(primitives, "scale_zero", scale_zero), (apply_module, "scale_zero", scale_zero),
               (obs_module, "scale_zero", scale_zero), (tune_module.TunedScales, "scale", _tuned_scale)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patched]
    for owner, name, value in patched:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def compact_bytes(shape: tuple[int, int], bits: int, group_size: int) -> int:
    """Codes at `bits` per weight, per group an 8-bit scale offset and a `bits`-bit zero, per row a 16-bit top."""
    rows, columns = shape
    groups = math.ceil(columns / group_size)
    return math.ceil(rows * (columns * bits + groups * (SCALE_BITS + bits) + ROW_BITS) / 8)
