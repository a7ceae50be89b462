"""llama.cpp's symmetric K-quants, Q6_K and Q3_K: super-blocks of 256 weights in 16 sub-blocks of 16, each sub-block
with its own integer scale times one float16 super-scale, no offsets.

Quantize follows ggml-quants.c (llama.cpp as vendored in llama-cpp-python 0.3.36) step for step: without an importance
vector `quantize_row_q6_K_ref` / `quantize_row_q3_K_ref`, with one `quantize_row_q6_K_impl` / `quantize_row_q3_K_impl`.
All blocks of a chunk of rows are searched at once: a group of 16 values is a column of a (16, groups) tensor, so each
of C's per-element loop steps is one contiguous row op, and sums run in C's order (element 0 first) with C's float32
operand order, so the chosen levels and scales are C's, not just close to them. Dequantize repeats gguf-py's float32
operations in its order, bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch

from shrink_core.compression.ggml.codec import Codec, f16_bytes, f16_from_bytes
from shrink_core.errors import ShrinkError

QK_K = 256
SUB = 16  # weights per sub-block, each with its own scale
Q6_K_SIZE = QK_K // 2 + QK_K // 4 + QK_K // 16 + 2  # ql, qh, int8 scales, d: 210
Q3_K_SIZE = QK_K // 8 + QK_K // 4 + 12 + 2  # hmask, qs, 6-bit scales, d: 110
GROUP_MAX_EPS = 1e-15  # ggml-quants.c: below this a group counts as all zero
CHUNK_WEIGHTS = 1 << 22  # weights searched at once: ~10 float32 temporaries of 16 MB stay well inside the quantizing budget


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: float32 -> int32 by adding 1.5 * 2^23 and reading the mantissa (round half to even, and the
    same wrap-around as C for out-of-range or non-finite values)."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x7FFFFF) - 0x400000


def _seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 one row at a time from 0.0, the order of C's `s += t[i]` loop."""
    acc = torch.zeros_like(t[0])
    for row in t:
        acc.add_(row)
    return acc


def _div(numerator: float, t: torch.Tensor) -> torch.Tensor:
    """float32 `numerator / t` as one IEEE division (torch's `scalar / tensor` multiplies by a reciprocal instead)."""
    return torch.div(torch.tensor(numerator, dtype=torch.float32), t)


def _first_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed value there) along dim; the first one on ties, as C's `if (ax > amax)` keeps it."""
    ax = x.abs()
    idx = ax.argmax(dim=dim, keepdim=True)
    return ax.gather(dim, idx).squeeze(dim), x.gather(dim, idx).squeeze(dim)


def _levels(x: torch.Tensor, iscale: torch.Tensor, nmax: int) -> torch.Tensor:
    """Signed levels clamp(nearest_int(iscale * x), -nmax, nmax - 1) as float32, for |iscale * x| small (a search's
    own scale), where torch's round-half-to-even is nearest_int."""
    return (iscale * x).round_().clamp_(-nmax, nmax - 1)


def _make_qx_quants(x: torch.Tensor, nmax: int, w: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_qx_quants with rmse_type 1 on the columns of x (n, groups): weights w (n, groups), or x^2 when None.
    Returns (scale (groups,), levels (n, groups) int32 in [0, 2 nmax), all 0 for an all-zero group)."""
    amax, mx = _first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if w is None else w
    wx = w * x

    def fit(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lv = _levels(x, iscale, nmax)
        return _seq_sum(lv * wx), _seq_sum((w * lv).mul_(lv))  # C's w*x*l and w*l*l

    best_iscale = _div(-nmax, mx)
    sumlx, suml2 = fit(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(suml2))
    best = scale * sumlx
    # C's grid: iscale = -(nmax + 0.1f * is) / max for is in -9..9 except 0, in that order, keeping strict improvements;
    # C recomputes the levels from the winning iscale, so keeping that iscale is enough
    for step in [s for s in range(-9, 10) if s]:
        iscale = _div(-float(np.float32(nmax) + np.float32(0.1) * np.float32(step)), mx)
        sumlx, suml2 = fit(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    levels = _levels(x, best_iscale, nmax).int() + nmax
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, levels)


def _q3_pass(x, w, wx, levels, sumlx, suml2, nmax: int):
    """One pass of make_q3_quants' coordinate descent over the 16 levels of each column, in C's order; updates
    `levels` in place and returns (sumlx, suml2, which columns changed)."""
    changed = torch.zeros(x.shape[1], dtype=torch.bool)
    for i in range(x.shape[0]):
        old = levels[i]
        slx = sumlx - wx[i] * old
        sl2 = suml2 - w[i] * old * old
        new = _nearest_int(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1).float()  # may be huge: C's nearest_int
        take = (slx > 0) & (new != old)
        slx = slx + wx[i] * new
        sl2 = sl2 + w[i] * new * new
        take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
        levels[i] = torch.where(take, new, old)
        sumlx = torch.where(take, slx, sumlx)
        suml2 = torch.where(take, sl2, suml2)
        changed |= take
    return sumlx, suml2, changed


def _make_q3_quants(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's make_q3_quants(n=16, nmax=4, do_rmse=true) on the columns of x (16, groups): start from max-scaled
    levels, then up to 5 passes of coordinate descent, each level in turn, weighted by x^2.
    Returns (scale (groups,), levels (16, groups) int32 in [0, 8), all 0 for an all-zero group)."""
    nmax = 4
    amax, mx = _first_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    levels = _levels(x, _div(-nmax, mx), nmax)
    sumlx = _seq_sum(wx * levels)
    suml2 = _seq_sum(w * levels * levels)
    sumlx, suml2, changed = _q3_pass(x, w, wx, levels, sumlx, suml2, nmax)
    # C stops a group after a pass that changes none of its levels (its state then stays as it is), so each further
    # pass only needs the groups the previous pass changed: typically ~14%, then ~4%, of them
    active = changed.nonzero().squeeze(1)
    for _ in range(4):
        if not active.numel():
            break
        part = levels[:, active]
        slx, sl2, changed = _q3_pass(x[:, active], w[:, active], wx[:, active], part, sumlx[active], suml2[active], nmax)
        levels[:, active], sumlx[active], suml2[active] = part, slx, sl2
        active = active[changed]
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(suml2))
    return torch.where(zero, 0.0, scale), torch.where(zero, 0, levels.int() + nmax)


def _columns(t: torch.Tensor, n: int) -> torch.Tensor:
    """(blocks, 256) -> (n, blocks * 256 / n): each group of n consecutive values becomes a contiguous column."""
    return t.reshape(-1, n).T.contiguous()


def _blocks_of(columns: torch.Tensor, n: int) -> torch.Tensor:
    return columns.T.reshape(-1, QK_K)


def _requantize(x: torch.Tensor, levels: torch.Tensor, d: torch.Tensor, nmax: int) -> torch.Tensor:
    """Levels from the stored scales: nearest_int(x / d_j) per sub-block whose d_j = d * sc_j is nonzero; a sub-block
    with d_j == 0 keeps the levels its search chose, as C does (they decode to 0 either way)."""
    d3 = d.unsqueeze(-1)
    fresh = _nearest_int(x.reshape(-1, SUB, SUB) / d3).clamp_(-nmax, nmax - 1) + nmax
    return torch.where(d3 != 0, fresh, levels.reshape(-1, SUB, SUB)).reshape(-1, QK_K)


def _pack_crumbs(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """Per 128 values, byte l holds values l, l+32, l+64, l+96 at bit offsets 0, bits, 2 bits, 3 bits."""
    q = levels.reshape(-1, QK_K // 128, 4, 32)
    packed = sum(q[:, :, k] << (bits * k) for k in range(4))
    return packed.reshape(levels.shape[0], -1)


def _quantize_q6_k_blocks(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """(blocks, 256) float32 -> (blocks, 210) uint8: quantize_row_q6_K_ref (qw None) or quantize_row_q6_K_impl."""
    n = x.shape[0]
    scales, levels = _make_qx_quants(_columns(x, SUB), 32, None if qw is None else _columns(qw, SUB))
    scales = scales.reshape(n, SUB)
    levels = _blocks_of(levels, SUB)
    max_abs, max_scale = _first_absmax(scales, 1)
    zero = max_abs < GROUP_MAX_EPS
    iscale = _div(-128.0, torch.where(zero, torch.ones_like(max_scale), max_scale))
    d16 = torch.where(zero, 0.0, _div(1.0, iscale)).half()
    sc = torch.clamp(_nearest_int(iscale.unsqueeze(1) * scales), max=127).to(torch.int8)  # C's MIN(127, .) into int8
    sc = torch.where(zero.unsqueeze(1), 0, sc)
    levels = _requantize(x, levels, d16.float().unsqueeze(1) * sc.float(), 32)
    levels = torch.where(zero.unsqueeze(1), 0, levels).to(torch.uint8)
    q = levels.reshape(n, 2, 4, 32)
    ql = torch.cat([(q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4), (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)], 2)
    qh = _pack_crumbs(levels >> 4, 2)
    return torch.cat([ql.reshape(n, -1), qh, sc.view(torch.uint8), f16_bytes(d16.unsqueeze(1))], 1)


def _pack_q3_scales(l6: torch.Tensor) -> torch.Tensor:
    """(blocks, 16) 6-bit scales -> 12 bytes: low nibbles of 0-7 and 8-15 in bytes 0-7, high crumbs in bytes 8-11."""
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    high = ((l6.reshape(-1, 4, 4) >> 4) << shifts).sum(1, dtype=torch.uint8)  # scale 4q + m -> byte 8 + m, bits 2q
    return torch.cat([low, high], 1)


def _q3_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """quantize_row_q3_K_impl's weights: qw * sqrt(sigma2 + x^2), sigma2 = 2 * sum(x^2) / 256 over the super-block."""
    sigma2 = 2 * _seq_sum(_columns(x * x, QK_K)) / QK_K
    # C's sqrtf is correctly rounded and torch's float32 sqrt is not always; float64 then float32 rounds as C does
    return qw * torch.sqrt((sigma2.unsqueeze(1) + x * x).double()).float()


def _quantize_q3_k_blocks(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """(blocks, 256) float32 -> (blocks, 110) uint8: quantize_row_q3_K_ref (qw None) or quantize_row_q3_K_impl."""
    n = x.shape[0]
    if qw is None:
        scales, levels = _make_q3_quants(_columns(x, SUB))
        scales = scales.reshape(n, SUB)
        _, max_scale = _first_absmax(scales, 1)
        some = max_scale != 0
        iscale = _div(-32.0, torch.where(some, max_scale, torch.ones_like(max_scale)))
        l6 = _nearest_int(iscale.unsqueeze(1) * scales).to(torch.int8).int().clamp_(-32, 31) + 32
        l6 = torch.where(some.unsqueeze(1), l6, 0).to(torch.uint8)  # no scale at all: C leaves the bytes zeroed
        d16 = torch.where(some, _div(1.0, iscale), 0.0).half()
    else:
        weights = _q3_weights(x, qw)
        cols = _columns(weights, SUB)
        scales, levels = _make_qx_quants(_columns(x, SUB), 4, cols)
        d_block, l6 = _make_qx_quants(scales.reshape(n, SUB).T.contiguous(), 32, _seq_sum(cols).reshape(n, SUB).T)
        l6 = l6.T.to(torch.uint8)
        d16 = d_block.half()
    levels = _blocks_of(levels, SUB)
    levels = _requantize(x, levels, d16.float().unsqueeze(1) * (l6.int() - 32).float(), 4)
    high = levels > 3
    hmask = (high.reshape(n, 8, 32).to(torch.uint8) << torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)).sum(
        1, dtype=torch.uint8)
    qs = _pack_crumbs((levels - 4 * high).to(torch.uint8), 2)
    return torch.cat([hmask, qs, _pack_q3_scales(l6), f16_bytes(d16.unsqueeze(1))], 1)


def _check(name: str, weight: torch.Tensor, importance: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[1] % QK_K:
        raise ShrinkError(f"{name} needs a 2-D weight whose rows are a multiple of {QK_K} wide, got shape "
                          f"{tuple(weight.shape)}; store this tensor in a type its row width allows.")
    if not torch.isfinite(weight).all():
        raise ShrinkError(f"{name}: the weight holds NaN or inf values; fix or reload the model before quantizing.")
    if importance is not None and (importance.shape != (weight.shape[1],) or not torch.isfinite(importance).all()):
        raise ShrinkError(f"{name}: the importance vector must be {weight.shape[1]} finite values (one per input "
                          f"column), got shape {tuple(importance.shape)}; recompute the importance matrix.")


def _quantizer(name: str, blocks_fn, type_size: int):
    def quantize(weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
        _check(name, weight, importance)
        rows, cols = weight.shape
        nb = cols // QK_K
        qw = None if importance is None else importance.float().reshape(1, nb, QK_K)
        out = torch.empty((rows, nb * type_size), dtype=torch.uint8)
        step = max(1, CHUNK_WEIGHTS // cols)
        for start in range(0, rows, step):
            part = weight[start:start + step].float()
            x = part.reshape(-1, QK_K)
            w = None if qw is None else qw.expand(part.shape[0], nb, QK_K).reshape(-1, QK_K)
            out[start:start + step] = blocks_fn(x, w).reshape(part.shape[0], -1)
        return out

    return quantize


def _dequantize_q6_k_blocks(b: torch.Tensor) -> torch.Tensor:
    """(blocks, 210) -> (blocks, 256), as gguf-py's Q6_K.dequantize_blocks: (d * scale) * q in float32."""
    n = b.shape[0]
    ql, qh = b[:, :128], b[:, 128:192]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (f16_from_bytes(b[:, 208:210]) * sc).reshape(n, SUB, 1)
    low = ((ql.reshape(n, 2, 1, 64) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 1, 2, 1)) & 0xF)
    high = (qh.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.reshape(n, SUB, SUB).float()).reshape(n, QK_K)


def _dequantize_q3_k_blocks(b: torch.Tensor) -> torch.Tensor:
    """(blocks, 110) -> (blocks, 256), as gguf-py's Q3_K.dequantize_blocks: (d * (scale - 32)) * q in float32, with
    q = low crumb - 4 where the hmask bit is clear."""
    n = b.shape[0]
    hmask, qs, packed = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = f16_from_bytes(b[:, 108:110])
    low = (packed[:, :8].reshape(n, 1, 8) >> torch.tensor([0, 4], dtype=torch.uint8).reshape(1, 2, 1)).reshape(n, 16)
    crumb = packed[:, 8:].reshape(n, 1, 4) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 4, 1)
    l6 = (low & 0xF) | ((crumb.reshape(n, 16) & 3) << 4)
    dl = (d * (l6.to(torch.int8) - 32).float()).reshape(n, SUB, 1)
    ql = (qs.reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(1, 1, 4, 1)) & 3
    qh = ((hmask.reshape(n, 1, 32) >> torch.arange(8, dtype=torch.uint8).reshape(1, 8, 1)) & 1) ^ 1
    q = ql.reshape(n, SUB, SUB).to(torch.int8) - (qh.reshape(n, SUB, SUB) << 2).to(torch.int8)
    return (dl * q.float()).reshape(n, QK_K)


def _dequantizer(name: str, blocks_fn, type_size: int):
    def dequantize(data: torch.Tensor, cols: int) -> torch.Tensor:
        if data.dim() != 2 or cols % QK_K or data.shape[1] != cols // QK_K * type_size:
            raise ShrinkError(f"{name} data of shape {tuple(data.shape)} does not hold rows of {cols} weights "
                              f"({cols // QK_K * type_size} bytes each); pass the bytes {name} quantize returned.")
        out = torch.empty((data.shape[0], cols), dtype=torch.float32)
        step = max(1, CHUNK_WEIGHTS // cols)
        for start in range(0, data.shape[0], step):
            part = data[start:start + step]
            out[start:start + step] = blocks_fn(part.reshape(-1, type_size)).reshape(part.shape[0], cols)
        return out

    return dequantize


def _codec(name: str, type_size: int, quantize_blocks, dequantize_blocks) -> Codec:
    return Codec(name, QK_K, type_size, _quantizer(name, quantize_blocks, type_size),
                 _dequantizer(name, dequantize_blocks, type_size))


CODECS: dict[str, Codec] = {
    "Q6_K": _codec("Q6_K", Q6_K_SIZE, _quantize_q6_k_blocks, _dequantize_q6_k_blocks),
    "Q3_K": _codec("Q3_K", Q3_K_SIZE, _quantize_q3_k_blocks, _dequantize_q3_k_blocks),
}
