"""llama.cpp's 32-wide legacy types Q8_0, Q5_0, Q5_1, Q4_0, Q4_1: block bytes as llama.cpp writes them.

Without an importance vector, quantization is llama.cpp's `quantize_row_<type>_ref` (byte for byte what gguf-py's
numpy quantizers produce). With one, it is the imatrix path of `quantize_<type>` (`quantize_row_<type>_impl`):
weights qw * sqrt(sigma2 + x^2), then `make_qx_quants` (symmetric types) or `make_qkx3_quants` (types with a min).
Q8_0 ignores the importance, as llama.cpp does. Dequantization repeats gguf-py's float32 operations in its order.

The helpers here (input checks, row chunking, nibble packing, llama.cpp's rounding) are shared with `iq4`.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from shrink_core.compression.ggml.codec import Codec, f16_bytes, f16_from_bytes
from shrink_core.errors import ShrinkError

CHUNK_FLOATS = 1 << 18  # weights per row chunk (1 MB float32): bounded memory, and temporaries stay in cache
GROUP_MAX_EPS = 1e-15  # llama.cpp: a group whose largest |x| is below this is all zero

# x (rows, blocks, block) float32, importance (blocks, block) or None -> uint8 (rows, blocks, type_size)
Encode = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# uint8 (n_blocks, type_size) -> float32 (n_blocks, block)
Decode = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------- shared plumbing


def f32(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float32 constant on `like`'s device: dividing by a tensor (not a Python number) keeps the division a true
    IEEE division on every device (CUDA turns division by a host scalar into a multiply by its reciprocal)."""
    return torch.tensor(np.float32(value), dtype=torch.float32, device=like.device)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `d ? 1/d : 0`."""
    return torch.where(d != 0, f32(1, d) / d, torch.zeros_like(d))


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |x|, the signed x where it is first reached) over the last axis, keepdim: llama.cpp's `if (ax > amax)`."""
    index = x.abs().argmax(dim=-1, keepdim=True)
    signed = x.gather(-1, index)
    return signed.abs(), signed


def round_half_away(v: torch.Tensor) -> torch.Tensor:
    """C's roundf, exactly: trunc plus one where the dropped fraction is at least a half (no float addition of 0.5,
    which rounds 0.49999997 up)."""
    a = v.abs()
    whole = a.floor()
    return torch.copysign(whole + torch.floor(2 * (a - whole)), v)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(..., 32) values 0..15 -> (..., 16) bytes: element j in the low nibble of byte j, element j+16 in the high."""
    q = q.to(torch.uint8)
    return (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (..., 16) bytes -> (..., 32) uint8."""
    return torch.cat([qs & 15, qs >> 4], dim=-1)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """(..., 32) zeros and ones -> (..., 4) bytes of a little-endian uint32 whose bit j is element j."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    b = bits.to(torch.uint8).reshape(*bits.shape[:-1], 4, 8) << shifts
    return b.sum(dim=-1, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_bits`: (..., 4) bytes -> (..., 32) uint8 zeros and ones."""
    shifts = torch.arange(8, dtype=torch.uint8, device=data.device)
    return ((data.unsqueeze(-1) >> shifts) & 1).reshape(*data.shape[:-1], 32)


def check_weight(name: str, block: int, weight: torch.Tensor, importance: torch.Tensor | None) -> None:
    if weight.dim() != 2 or weight.shape[1] % block or not weight.is_floating_point():
        raise ShrinkError(f"{name} needs a 2-D float weight whose rows are a multiple of {block} wide, got "
                          f"{tuple(weight.shape)} {weight.dtype}; pick a type whose block divides the row width.")
    if not torch.isfinite(weight).all():
        raise ShrinkError(f"The weight given to {name} contains NaN or infinite values; fix or reload the model "
                          "before quantizing it.")
    if importance is not None and tuple(importance.shape) != (weight.shape[1],):
        raise ShrinkError(f"{name} needs one importance value per input column ({weight.shape[1]}), got shape "
                          f"{tuple(importance.shape)}; pass the imatrix entry of this very tensor.")
    if importance is not None and not torch.isfinite(importance).all():
        raise ShrinkError(f"The importance vector given to {name} contains NaN or infinite values; recompute the "
                          "imatrix from finite activations.")


def row_step(cols: int) -> int:
    return max(1, CHUNK_FLOATS // cols)


def quantize_rows(name: str, block: int, type_size: int, encode: Encode,
                  weight: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Run `encode` over row chunks of `weight` viewed as (rows, blocks, block); returns (rows, blocks * type_size)."""
    check_weight(name, block, weight, importance)
    rows, cols = weight.shape
    blocks = cols // block
    out = torch.empty(rows, blocks * type_size, dtype=torch.uint8, device=weight.device)
    qw = None if importance is None else importance.to(weight.device, torch.float32).reshape(blocks, block)
    step = row_step(cols)
    for start in range(0, rows, step):
        x = weight[start:start + step].to(torch.float32).reshape(-1, blocks, block)
        out[start:start + step] = encode(x, qw).reshape(x.shape[0], blocks * type_size)
    return out


def dequantize_rows(name: str, block: int, type_size: int, decode: Decode, data: torch.Tensor, cols: int) -> torch.Tensor:
    """Run `decode` over row chunks of block bytes; returns float32 (rows, cols)."""
    if data.dim() != 2 or data.dtype != torch.uint8 or cols % block or data.shape[1] != cols // block * type_size:
        raise ShrinkError(f"{name} data must be uint8 (rows, {cols // block * type_size}) for rows {cols} wide, got "
                          f"{tuple(data.shape)} {data.dtype}; pass the bytes this type's quantize returned.")
    rows = data.shape[0]
    out = torch.empty(rows, cols, dtype=torch.float32, device=data.device)
    step = row_step(cols)
    for start in range(0, rows, step):
        chunk = data[start:start + step].reshape(-1, type_size)
        out[start:start + step] = decode(chunk).reshape(-1, cols)
    return out


def make_codec(name: str, block: int, type_size: int, encode: Encode, decode: Decode) -> Codec:
    return Codec(name, block, type_size,
                 quantize=lambda weight, importance: quantize_rows(name, block, type_size, encode, weight, importance),
                 dequantize=lambda data, cols: dequantize_rows(name, block, type_size, decode, data, cols))


# ---------------------------------------------------------------- reference (no importance) quantizers


def symmetric_ref(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_0/Q5_0 `_ref`: d = (signed absmax) / -nmax, q = trunc(x/d + nmax + 0.5) in [0, 2 nmax - 1]."""
    _, signed = first_absmax(x)
    d = signed / f32(-nmax, x)
    q = torch.trunc(x * safe_inverse(d) + f32(nmax + 0.5, x)).clamp(0, 2 * nmax - 1)
    return d, q


def affine_ref(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1/Q5_1 `_ref`: d = (max - min) / nmax, m = min, q = trunc((x - min)/d + 0.5) in [0, nmax]."""
    lo = x.amin(dim=-1, keepdim=True)
    d = (x.amax(dim=-1, keepdim=True) - lo) / f32(nmax, x)
    q = torch.trunc((x - lo) * safe_inverse(d) + f32(0.5, x)).clamp(0, nmax)
    return d, lo, q


# ---------------------------------------------------------------- imatrix quantizers


def legacy_weights(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """`quantize_row_<type>_impl`'s per-weight importance: qw * sqrt(sigma2 + x^2), sigma2 the row's mean square."""
    sigma2 = x.square().sum(dim=(-2, -1), keepdim=True) / f32(x.shape[-2] * x.shape[-1], x)
    return qw * torch.sqrt(sigma2 + x * x)


def make_qx_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """llama.cpp's `make_qx_quants` with weights (rmse_type 1): try scales -(nmax + 0.1 k)/max, k = -9..9, keep the
    one maximising (sum w x l)^2 / sum w l^2. Returns (scale (..., 1), L in [0, 2 nmax - 1])."""
    amax, signed = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed = torch.where(zero, 1.0, signed)  # any finite value: the result is dropped, and no NaN is made
    wx = w * x

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return (iscale * x).round_().clamp_(-nmax, nmax - 1)

    def trial(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l = levels(iscale)  # noqa: E741 (llama.cpp's name)
        return (wx * l).sum(dim=-1, keepdim=True), (w * l * l).sum(dim=-1, keepdim=True)

    best_iscale = f32(-nmax, x) / signed
    sumlx, suml2 = trial(best_iscale)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for k in range(-9, 10):
        if k == 0:
            continue
        iscale = f32(-(np.float32(nmax) + np.float32(0.1) * np.float32(k)), x) / signed
        sumlx, suml2 = trial(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = torch.where(better, iscale, best_iscale)  # the levels are remade once at the end
        scale = torch.where(better, sumlx / suml2, scale)
        best = torch.where(better, scale * sumlx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, 0.0, levels(best_iscale) + nmax)


def make_qkx3_quants(x: torch.Tensor, w: torch.Tensor, nmax: int,
                     rmin: float = -0.9, rdelta: float = 0.05, nstep: int = 36) -> tuple[torch.Tensor, ...]:
    """llama.cpp's `make_qkx3_quants` (squared error, not MAD): x ~ scale * L + min with min <= 0, trying
    iscale = (rmin + rdelta k + nmax) / (max - min) for k = 0..nstep and refitting scale and min by weighted least
    squares each time; as in llama.cpp, `min` in that grid is the best min found so far. Returns (scale, min,
    L in [0, nmax]), scale and min (..., 1)."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True)
    flat = hi <= lo  # all values equal and <= 0: llama.cpp stores d = 0, m = that value
    hi = torch.where(flat, lo + 1, hi)  # keeps the (dropped) search of a flat block free of NaN
    sum_w = w.sum(dim=-1, keepdim=True)
    sum_x = (w * x).sum(dim=-1, keepdim=True)

    def levels(iscale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        return (x - shift).mul_(iscale).round_().clamp_(0, nmax)

    def error(scale: torch.Tensor, minimum: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
        diff = (scale * l).add_(minimum).sub_(x)
        return (diff.square_().mul_(w)).sum(dim=-1, keepdim=True)

    best_iscale, best_shift = f32(nmax, x) / (hi - lo), lo
    scale = f32(1, x) / best_iscale
    minimum = lo
    best_mad = error(scale, minimum, levels(best_iscale, best_shift))
    for k in range(nstep + 1):
        iscale = f32(np.float32(rmin) + np.float32(rdelta) * np.float32(k) + np.float32(nmax), x) / (hi - minimum)
        l = levels(iscale, minimum)  # noqa: E741
        wl = w * l
        sum_l = wl.sum(dim=-1, keepdim=True)
        sum_l2 = (wl * l).sum(dim=-1, keepdim=True)
        sum_xl = wl.mul_(x).sum(dim=-1, keepdim=True)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        clipped = this_min > 0
        this_scale = torch.where(clipped, sum_xl / sum_l2, this_scale)
        this_min = torch.where(clipped, 0.0, this_min)
        mad = error(this_scale, this_min, l)
        better = (det > 0) & (mad < best_mad)
        best_iscale = torch.where(better, iscale, best_iscale)  # the levels are remade once at the end
        best_shift = torch.where(better, minimum, best_shift)
        best_mad = torch.where(better, mad, best_mad)
        scale = torch.where(better, this_scale, scale)
        minimum = torch.where(better, this_min, minimum)
    best_l = levels(best_iscale, best_shift)
    return torch.where(flat, 0.0, scale), torch.where(flat, lo, minimum), torch.where(flat, 0.0, best_l)


# ---------------------------------------------------------------- the five types


def _symmetric(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    return symmetric_ref(x, nmax) if qw is None else make_qx_quants(x, legacy_weights(x, qw), nmax)


def _affine(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if qw is None:
        return affine_ref(x, nmax)
    return make_qkx3_quants(x, legacy_weights(x, qw), nmax)


def encode_q4_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, q = _symmetric(x, qw, 8)
    return torch.cat([f16_bytes(d), pack_nibbles(q)], dim=-1)


def encode_q4_1(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, m, q = _affine(x, qw, 15)
    return torch.cat([f16_bytes(d), f16_bytes(m), pack_nibbles(q)], dim=-1)


def encode_q5_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, q = _symmetric(x, qw, 16)
    q = q.to(torch.uint8)
    return torch.cat([f16_bytes(d), pack_bits(q >> 4), pack_nibbles(q)], dim=-1)


def encode_q5_1(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    d, m, q = _affine(x, qw, 31)
    q = q.to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(m), pack_bits(q >> 4), pack_nibbles(q)], dim=-1)


def encode_q8_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """`quantize_row_q8_0_ref` whatever the importance: llama.cpp's `quantize_q8_0` ignores the imatrix."""
    d = x.abs().amax(dim=-1, keepdim=True) / f32(127, x)
    q = round_half_away(x * safe_inverse(d)).to(torch.int8)
    return torch.cat([f16_bytes(d), q.view(torch.uint8)], dim=-1)


def decode_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_from_bytes(blocks[:, :2])
    return d * (unpack_nibbles(blocks[:, 2:]).to(torch.int8) - 8).to(torch.float32)


def decode_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_from_bytes(blocks[:, :2]), f16_from_bytes(blocks[:, 2:4])
    return d * unpack_nibbles(blocks[:, 4:]).to(torch.float32) + m


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    return unpack_nibbles(qs) | (unpack_bits(qh) << 4)


def decode_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_from_bytes(blocks[:, :2])
    return d * (_five_bit(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16).to(torch.float32)


def decode_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = f16_from_bytes(blocks[:, :2]), f16_from_bytes(blocks[:, 2:4])
    return d * _five_bit(blocks[:, 4:8], blocks[:, 8:]).to(torch.float32) + m


def decode_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_from_bytes(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d


CODECS: dict[str, Codec] = {
    "Q8_0": make_codec("Q8_0", 32, 34, encode_q8_0, decode_q8_0),
    "Q5_0": make_codec("Q5_0", 32, 22, encode_q5_0, decode_q5_0),
    "Q5_1": make_codec("Q5_1", 32, 24, encode_q5_1, decode_q5_1),
    "Q4_0": make_codec("Q4_0", 32, 18, encode_q4_0, decode_q4_0),
    "Q4_1": make_codec("Q4_1", 32, 20, encode_q4_1, decode_q4_1),
}
