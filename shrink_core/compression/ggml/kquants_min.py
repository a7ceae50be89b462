"""llama.cpp's K-quants with a scale and a min per sub-block: Q4_K, Q5_K (8 sub-blocks of 32) and Q2_K (16 of 16).

Each 256-weight super-block stores float16 `d` and `dmin`, and per sub-block a quantized scale `sc` and min `m`
(6 bits packed as get_scale_min_k4 reads them for Q4_K/Q5_K, 4 + 4 bits for Q2_K); weight = d * sc * q - dmin * m.

Quantizing follows ggml-quants.c of the llama.cpp vendored in llama-cpp-python 0.3.36:
- no importance: `quantize_row_<type>_ref`: make_qkx2_quants per sub-block, then the sub-block scales and mins are
  rounded against the largest of each;
- importance: `quantize_row_<type>_impl`: make_qkx3_quants with weights imatrix * sqrt(sigma2 + x^2), then
  make_qp_quants picks the super-block scales of the sub-block scales and mins.
Both finish by requantizing every weight against the stored (float16-rounded) scales. Everything runs on all blocks
of a chunk of rows at once; the only Python loops walk llama.cpp's fixed search grids (and make_qp_quants' levels).
Every product and quotient is C's, in float32 and in C's order; only sums are added in torch's order rather than
one by one, so a near-tie in a search may break the other way (on SmolLM2 weights 96-100% of blocks come out
byte-identical to ggml-quants.c built without FMA). Sums run along each group's row, so a row's bytes do not depend
on which other rows are quantized with it.
Deviation: a negative level that C would wrap around in a uint8 (only for degenerate sub-blocks) is clamped to 0.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shrink_core.compression.ggml.codec import Codec, f16_bytes, f16_from_bytes
from shrink_core.errors import ShrinkError

QK_K = 256
CHUNK_ELEMENTS = 4 << 20  # weights quantized at once (16 MB of float32; the searches keep ~10 such arrays alive)
FIT_SLICE = 1 << 16  # weights searched at once (256 KB arrays, which stay in a core's L2 cache)
GROUP_MAX_EPS = 1e-15  # make_qp_quants: below this largest scale the sub-block scales are all zero


@dataclass(frozen=True)
class Search:
    """make_qkx2/3_quants' grid: inverse scales (rmin + rdelta * step + nmax) / (max - min), step = 0..nstep;
    `use_mad` scores candidates by weighted absolute instead of squared error."""

    rmin: float
    rdelta: float
    nstep: int
    use_mad: bool

    def numerators(self, nmax: int) -> list[np.float32]:
        # float32 arithmetic, as C computes `rmin + rdelta*is + nmax`
        f = np.float32
        return [f(f(self.rmin) + f(self.rdelta) * f(step)) + f(nmax) for step in range(self.nstep + 1)]


IMATRIX_SEARCH = Search(-0.9, 0.05, 36, False)  # make_qkx3_quants in every *_impl


@dataclass(frozen=True)
class Scheme:
    """How one type cuts a super-block and searches its scales."""

    name: str
    sub: int  # weights per sub-block
    nmax: int  # largest level of a weight
    scale_max: int  # largest quantized sub-block scale or min (6 bits: 63, 4 bits: 15)
    ref_search: Search
    ref_weights: Callable[[torch.Tensor], torch.Tensor]  # sub-blocks (B, sub) -> make_qkx2_quants weights
    sigma2_factor: float  # imatrix path: sigma2 = factor * sum(x^2) / 256


def _rms_plus_abs(x: torch.Tensor) -> torch.Tensor:
    # Q4_K/Q5_K ref: av_x + |x| with av_x the sub-block's root mean square
    av_x = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1])
    return av_x + x.abs()


Q4_K_SCHEME = Scheme("Q4_K", 32, 15, 63, Search(-1.0, 0.1, 20, False), _rms_plus_abs, 2.0)
Q5_K_SCHEME = Scheme("Q5_K", 32, 31, 63, Search(-0.5, 0.1, 15, False), _rms_plus_abs, 2.0)
Q2_K_SCHEME = Scheme("Q2_K", 16, 3, 15, Search(-0.5, 0.1, 15, True), torch.abs, 1.0)


# ---------------------------------------------------------------- the searches (each on a batch of groups at once)

def _over(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """numerator / t rounded once, like C; torch computes `scalar / tensor` as scalar * (1 / tensor), off by an ulp."""
    return torch.tensor(float(numerator)) / t  # a 0-d tensor divides exactly


class _Groups:
    """A slice of groups (B, n) and the scratch arrays the grid search reuses in place (torch is memory-bound here:
    fresh arrays every step cost ~2x). Per-group values are (B, 1) columns. Sums run along rows, which torch
    reduces the same way whatever the batch, so a row's bytes never depend on the rows quantized with it."""

    def __init__(self, x: torch.Tensor, w: torch.Tensor, nmax: int, use_mad: bool):
        self.x, self.w, self.nmax, self.use_mad = x, w, nmax, use_mad
        self.levels = torch.empty_like(x)
        self.work = torch.empty_like(x)
        self.wl = torch.empty_like(x)

    def round(self, iscale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """levels = nearest_int(iscale * (x - min)) clamped to [0, nmax]; torch.round is half-to-even like C's."""
        return torch.sub(self.x, low, out=self.levels).mul_(iscale).round_().clamp_(0, self.nmax)

    def error(self, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        diff = torch.mul(self.levels, scale, out=self.work).add_(low).sub_(self.x)  # C: scale * L + min - x
        diff = diff.abs_() if self.use_mad else diff.mul_(diff)
        return diff.mul_(self.w).sum(-1, keepdim=True)

    def sums(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sum w*l, sum w*l*l, sum w*l*x over each group, with C's products."""
        wl = torch.mul(self.w, self.levels, out=self.wl)
        sum_l2 = torch.mul(wl, self.levels, out=self.work).sum(-1, keepdim=True)
        sum_xl = torch.mul(wl, self.x, out=self.work).sum(-1, keepdim=True)
        return wl.sum(-1, keepdim=True), sum_l2, sum_xl


def _fit_slice(x: torch.Tensor, w: torch.Tensor, nmax: int, search: Search):
    """make_qkx2_quants / make_qkx3_quants (identical given weights) on groups x, w (B, n): (scale (B, 1),
    the_min (B, 1) >= 0 so that x ~ scale * L - the_min, levels L (B, n) float).

    As in C, each improvement also moves the offset later grid steps round against (`min` is both the range's low
    end and the best fit's offset)."""
    g = _Groups(x, w, nmax, search.use_mad)
    low = x.amin(-1, keepdim=True).clamp(max=0)  # the range always holds 0
    high = x.amax(-1, keepdim=True)
    flat = high == low
    high = torch.where(flat, low + 1, high)  # any non-empty range: flat groups keep their first answer anyway
    sum_w = w.sum(-1, keepdim=True)
    sum_x = (w * x).sum(-1, keepdim=True)

    iscale = _over(nmax, high - low)
    scale = 1 / iscale
    g.round(iscale, low)
    best_error = g.error(scale, low).masked_fill_(flat, -torch.inf)  # nothing beats -inf: flat groups stay put
    # rows: best error, then how the winning levels were rounded (iscale, low), then the fit (scale, low)
    state = torch.stack([best_error, iscale, low, scale, low])
    for numerator in search.numerators(nmax):
        low = state[4]
        iscale = _over(numerator, high - low)
        g.round(iscale, low)
        sum_l, sum_l2, sum_xl = g.sums()
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0  # a min above 0 is pinned to 0 and the scale refitted alone
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = this_min.masked_fill_(positive, 0)
        error = g.error(this_scale, this_min)
        better = (det > 0) & (error < state[0])
        state = torch.where(better, torch.stack([error, iscale, low, this_scale, this_min]), state)
    levels = g.round(state[1], state[2]).masked_fill_(flat, 0)  # the winner's levels, same float ops
    return state[3].masked_fill(flat, 0), -state[4], levels


def fit_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, search: Search):
    """_fit_slice over groups x, w (B, n) -> (scale (B,), the_min (B,), levels (B, n)), FIT_SLICE weights at a
    time so the search's arrays stay in the CPU cache."""
    scales, mins = torch.empty(x.shape[0]), torch.empty(x.shape[0])
    levels = torch.empty_like(x)
    per = max(1, FIT_SLICE // x.shape[1])
    for start in range(0, x.shape[0], per):
        end = start + per
        scale, the_min, part = _fit_slice(x[start:end], w[start:end], nmax, search)
        scales[start:end], mins[start:end], levels[start:end] = scale[:, 0], the_min[:, 0], part
    return scales, mins, levels


def _sq_error(x, scale, levels, qw) -> torch.Tensor:
    diff = x - levels * scale.unsqueeze(-1)  # C: x - scale*L, then w*diff*diff
    return (qw * diff * diff).sum(-1)


def fit_scale(x: torch.Tensor, nmax: int, qw: torch.Tensor):
    """make_qp_quants on groups x (B, n) >= 0 with weights qw (B, n): (scale (B,), levels (B, n) float in
    [0, nmax])."""
    high = x.amax(-1).clamp(min=0)
    zero = high < GROUP_MAX_EPS
    high = high.masked_fill_(zero, 1)
    iscale = _over(nmax, high)
    best = _sq_error(x, 1 / iscale, torch.round(x * iscale.unsqueeze(-1)), qw)
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_step = _over(np.float32(np.float32(0.1) * np.float32(step)) + np.float32(nmax), high)
        error = _sq_error(x, 1 / iscale_step, torch.round(x * iscale_step.unsqueeze(-1)).clamp_(max=nmax), qw)
        better = error < best
        best = torch.where(better, error, best)
        iscale = torch.where(better, iscale_step, iscale)
    levels = torch.round(x * iscale.unsqueeze(-1)).clamp_(0, nmax)
    wx = qw * x
    sum_lx = (wx * levels).sum(-1)
    sum_l2 = (qw * levels * levels).sum(-1)
    # the descent walks one level of every group at a time: columns (n, B) make those reads contiguous
    x, qw, wx, levels = x.T.contiguous(), qw.T.contiguous(), wx.T.contiguous(), levels.T.contiguous()
    # up to 5 passes of coordinate descent, each level in turn given the others; stops when a pass changes nothing
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            w, li = qw[i], levels[i]
            slx = sum_lx - wx[i] * li
            sl2 = sum_l2 - w * li * li
            usable = (slx > 0) & (sl2 > 0)
            new_l = torch.round(x[i] * sl2 / slx).clamp_(0, nmax)
            slx = slx + wx[i] * new_l
            sl2 = sl2 + w * new_l * new_l
            take = usable & (new_l != li) & (slx * slx * sum_l2 > sum_lx * sum_lx * sl2)
            levels[i] = torch.where(take, new_l, li)
            sum_lx = torch.where(take, slx, sum_lx)
            sum_l2 = torch.where(take, sl2, sum_l2)
            changed |= take
        if not changed.any():
            break
    scale = torch.where(sum_l2 > 0, sum_lx / sum_l2, torch.zeros_like(sum_l2)).masked_fill_(zero, 0)
    return scale, levels.masked_fill_(zero, 0).T


# ---------------------------------------------------------------- one chunk of super-blocks -> levels and scales

@dataclass(frozen=True)
class Levels:
    """A chunk of N super-blocks, quantized: float16 d and dmin (N,), sub-block scales and mins (N, S) and weight
    levels (N, 256), all integers as uint8."""

    d: torch.Tensor
    dmin: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor
    levels: torch.Tensor


def _round_to_largest(values: torch.Tensor, top: int):
    """The ref paths: sub-block values (N, S) as levels of largest / top (0 when none is positive)."""
    largest = values.amax(-1)
    largest = torch.where(largest > 0, largest, 0.0)  # C starts from +0 (a clamp would keep the -0 of a flat group)
    inverse = torch.where(largest > 0, _over(top, largest), torch.zeros_like(largest))
    levels = torch.round(inverse.unsqueeze(-1) * values).clamp_(0, top)
    return (largest / top).to(torch.float16), levels


def quantize_levels(x: torch.Tensor, importance: torch.Tensor | None, scheme: Scheme) -> Levels:
    """Super-blocks x (N, 256) float32, importance (N, 256) or None -> their levels under `scheme`."""
    n = x.shape[0]
    per = QK_K // scheme.sub
    groups = x.reshape(-1, scheme.sub)
    if importance is None:
        weights = scheme.ref_weights(groups)
        scales, mins, fitted = fit_scale_min(groups, weights, scheme.nmax, scheme.ref_search)
        d, sc = _round_to_largest(scales.view(n, per), scheme.scale_max)
        dmin, m = _round_to_largest(mins.view(n, per), scheme.scale_max)
    else:
        sigma2 = scheme.sigma2_factor * (x * x).sum(-1, keepdim=True) / QK_K
        weights = (importance * torch.sqrt(sigma2 + x * x)).view(-1, scheme.sub)
        scales, mins, fitted = fit_scale_min(groups, weights, scheme.nmax, IMATRIX_SEARCH)
        sum_w = weights.sum(-1).view(n, per)
        d_block, sc = fit_scale(scales.view(n, per), scheme.scale_max, sum_w)
        m_block, m = fit_scale(mins.view(n, per), scheme.scale_max, sum_w)
        d, dmin = d_block.to(torch.float16), m_block.to(torch.float16)
    # requantize every weight against the stored scales; a sub-block whose scale is 0 keeps the search's levels
    step = (d.float().unsqueeze(-1) * sc).reshape(-1, 1)
    offset = (dmin.float().unsqueeze(-1) * m).reshape(-1, 1)
    requant = torch.round((groups + offset) / step).clamp_(0, scheme.nmax)
    levels = torch.where(step != 0, requant, fitted)
    if not (torch.isfinite(d).all() and torch.isfinite(dmin).all()):
        raise ShrinkError(f"{scheme.name} cannot store these weights: their scales overflow float16 (weights around "
                          "1e6 in magnitude or more); rescale the tensor or keep it in F32.")
    u8 = torch.uint8
    return Levels(d, dmin, sc.to(u8), m.to(u8), levels.to(u8).view(n, QK_K))


# ---------------------------------------------------------------- block bytes

def _pack_k4_scales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """(N, 8) 6-bit scales and mins -> the 12 bytes get_scale_min_k4 reads."""
    low_sc, high_sc, low_m, high_m = sc[:, :4], sc[:, 4:], m[:, :4], m[:, 4:]
    return torch.cat([low_sc | (high_sc >> 4) << 6, low_m | (high_m >> 4) << 6,
                      (high_sc & 0xF) | (high_m & 0xF) << 4], 1)


def _unpack_k4_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 12) bytes -> (N, 8) scales and mins, as gguf-py's Q4_K.get_scale_min."""
    d, m, m_d = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = torch.cat([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], 1)
    mn = torch.cat([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], 1)
    return sc, mn


def _head(q: Levels) -> list[torch.Tensor]:
    return [f16_bytes(q.d.unsqueeze(-1)), f16_bytes(q.dmin.unsqueeze(-1))]


def _nibbles(levels: torch.Tensor) -> torch.Tensor:
    """(N, 256) levels -> (N, 128): byte 32c + l holds weight 64c + l low and 64c + 32 + l high (low 4 bits)."""
    pairs = (levels & 0xF).view(-1, 4, 2, 32)
    return (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, 128)


def _bytes_q4_k(q: Levels) -> torch.Tensor:
    return torch.cat([*_head(q), _pack_k4_scales(q.scales, q.mins), _nibbles(q.levels)], 1)


def _bytes_q5_k(q: Levels) -> torch.Tensor:
    # qh[l] bit k is the fifth bit of weight 32k + l
    high = (q.levels >> 4).view(-1, 8, 32).to(torch.int32) << torch.arange(8, dtype=torch.int32).view(1, 8, 1)
    qh = high.sum(1).to(torch.uint8)
    return torch.cat([*_head(q), _pack_k4_scales(q.scales, q.mins), qh, _nibbles(q.levels)], 1)


def _bytes_q2_k(q: Levels) -> torch.Tensor:
    # qs[32h + l] holds weights 128h + 32s + l at bits 2s
    crumbs = q.levels.view(-1, 2, 4, 32).to(torch.int32) << (2 * torch.arange(4, dtype=torch.int32)).view(1, 1, 4, 1)
    qs = crumbs.sum(2).to(torch.uint8).reshape(-1, 64)
    return torch.cat([q.scales | q.mins << 4, qs, *_head(q)], 1)


def _check(weight: torch.Tensor, importance: torch.Tensor | None, name: str) -> None:
    if weight.dim() != 2 or weight.shape[1] % QK_K:
        raise ShrinkError(f"{name} needs a matrix whose rows are a multiple of {QK_K} wide, not {tuple(weight.shape)}; "
                          "use a type with 32-wide blocks (e.g. Q4_0) for this tensor.")
    if not torch.isfinite(weight).all():
        raise ShrinkError(f"The weight given to {name} holds NaN or infinite values; fix the checkpoint before "
                          "quantizing it.")
    if importance is not None and (importance.shape != (weight.shape[1],) or not torch.isfinite(importance).all()):
        raise ShrinkError(f"The importance vector for {name} must hold {weight.shape[1]} finite values (one per input "
                          f"column), not shape {tuple(importance.shape)}; recompute the importance matrix.")


def _quantizer(scheme: Scheme, to_bytes: Callable[[Levels], torch.Tensor]):
    def quantize(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        _check(weight, importance, scheme.name)
        rows, cols = weight.shape
        blocks = cols // QK_K
        chunk = max(1, CHUNK_ELEMENTS // cols)
        imp = None if importance is None else importance.to(torch.float32).view(1, blocks, QK_K)
        parts = []
        for start in range(0, rows, chunk):
            part = weight[start:start + chunk].to(torch.float32)
            n = part.shape[0]
            part_imp = None if imp is None else imp.expand(n, blocks, QK_K).reshape(-1, QK_K)
            levels = quantize_levels(part.reshape(-1, QK_K), part_imp, scheme)
            parts.append(to_bytes(levels).view(n, -1))
        return torch.cat(parts, 0) if parts else torch.empty((0, blocks * TYPE_SIZES[scheme.name]), dtype=torch.uint8)

    return quantize


# ---------------------------------------------------------------- dequantize (gguf-py's float ops, in its order)

def _dequantize_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = f16_from_bytes(blocks[:, 0:2]), f16_from_bytes(blocks[:, 2:4])
    sc, m = _unpack_k4_scales(blocks[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)
    offset = (dmin * m.float()).unsqueeze(-1)
    qs = blocks[:, 16:144].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    qs = (qs & 0x0F).reshape(-1, 8, 32).float()
    return (scale * qs - offset).reshape(-1, QK_K)


def _dequantize_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin = f16_from_bytes(blocks[:, 0:2]), f16_from_bytes(blocks[:, 2:4])
    sc, m = _unpack_k4_scales(blocks[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)
    offset = (dmin * m.float()).unsqueeze(-1)
    ql = blocks[:, 48:176].reshape(-1, 4, 1, 32) >> torch.tensor([0, 4], dtype=torch.uint8).view(1, 1, 2, 1)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    q = ((ql & 0x0F).reshape(-1, 8, 32) | (qh & 0x01) << 4).float()
    return (scale * q - offset).reshape(-1, QK_K)


def _dequantize_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    scales = blocks[:, 0:16]
    d, dmin = f16_from_bytes(blocks[:, 80:82]), f16_from_bytes(blocks[:, 82:84])
    scale = (d * (scales & 0xF).float()).unsqueeze(-1)
    offset = (dmin * (scales >> 4).float()).unsqueeze(-1)
    qs = blocks[:, 16:80].reshape(-1, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qs = (qs & 3).reshape(-1, 16, 16).float()
    return (scale * qs - offset).reshape(-1, QK_K)


def _dequantizer(name: str, blocks_fn: Callable[[torch.Tensor], torch.Tensor]):
    type_size = TYPE_SIZES[name]

    def dequantize(data: torch.Tensor, cols: int) -> torch.Tensor:
        rows = data.shape[0]
        if data.dim() != 2 or cols % QK_K or data.shape[1] != cols // QK_K * type_size:
            raise ShrinkError(f"{name} data of shape {tuple(data.shape)} does not hold rows of {cols} weights; "
                              "pass the bytes quantize returned with the matching column count.")
        out = torch.empty((rows, cols), dtype=torch.float32)
        chunk = max(1, CHUNK_ELEMENTS // max(cols, 1))
        for start in range(0, rows, chunk):
            part = data[start:start + chunk].contiguous()
            out[start:start + chunk] = blocks_fn(part.view(-1, type_size)).view(part.shape[0], cols)
        return out

    return dequantize


TYPE_SIZES = {"Q4_K": 144, "Q5_K": 176, "Q2_K": 84}

CODECS: dict[str, Codec] = {
    scheme.name: Codec(scheme.name, QK_K, TYPE_SIZES[scheme.name], _quantizer(scheme, to_bytes),
                       _dequantizer(scheme.name, blocks_fn))
    for scheme, to_bytes, blocks_fn in (
        (Q4_K_SCHEME, _bytes_q4_k, _dequantize_q4_k),
        (Q5_K_SCHEME, _bytes_q5_k, _dequantize_q5_k),
        (Q2_K_SCHEME, _bytes_q2_k, _dequantize_q2_k),
    )
}
