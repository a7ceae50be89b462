"""llama.cpp's non-linear 4-bit types IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256 with 6-bit sub-scales).

Both map each weight to one of 16 fixed levels (`kvalues_iq4nl`) times a block scale, found as in llama.cpp's
`quantize_row_iq4_nl_impl` with ntry = 7: start from scale max/-127, then try the 15 scales max/(k - 127),
k = -7..7, keeping the one that maximises (sum w q x)^2 / sum w q^2. That is what llama-quantize runs for these types
with or without an imatrix (`quantize_iq4_nl` / `quantize_iq4_xs`): without one, the weights are x^2; with one,
qw * sqrt(sigma2 + x^2), sigma2 twice the mean square of the super-block. (`quantize_row_iq4_nl_ref`, with ntry = -1,
is only ggml's on-the-fly conversion, not what model files are made with.)
"""
from __future__ import annotations

import torch

from shrink_core.compression.ggml.codec import Codec, f16_bytes, f16_from_bytes
from shrink_core.compression.ggml.legacy import (
    GROUP_MAX_EPS,
    f32,
    first_absmax,
    make_codec,
    pack_nibbles,
    safe_inverse,
    unpack_nibbles,
)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
NTRY = 7


def _levels(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=like.device)


def _index_table(like: torch.Tensor) -> torch.Tensor:
    """Level index for each t = floor(2 v), t in -256..256 (offset by 256). llama.cpp's `best_index_int8` picks the
    nearest level, the upper on a tie; every midpoint between levels is a multiple of 1/2 and both distances are exact
    in float32 near it, so its `v - lo < hi - v` is exactly `2 v < 2 midpoint`, which floor(2 v) decides."""
    levels = torch.tensor(KVALUES, dtype=torch.float64, device=like.device)
    mids = (levels[:-1] + levels[1:]) / 2
    return torch.searchsorted(mids, torch.arange(-256, 257, device=like.device) / 2, right=True)


def _table_slot(v: torch.Tensor) -> torch.Tensor:
    return (v * 2).floor_().clamp_(-256, 256).add_(256).long()


def best_index(v: torch.Tensor) -> torch.Tensor:
    """llama.cpp's `best_index_int8(16, kvalues_iq4nl, v)`, elementwise."""
    return torch.take(_index_table(v), _table_slot(v))


def _fit(x: torch.Tensor, w: torch.Tensor, inverse_scale: torch.Tensor,
         table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap x * inverse_scale to the levels (`table` maps its slot to the level); (sum w q x, sum w q^2)."""
    q = torch.take(table, _table_slot(inverse_scale * x))
    wq = w * q
    return (wq * x).sum(dim=-1, keepdim=True), (wq * q).sum(dim=-1, keepdim=True)


def block_scales(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The best scale of each 32-block (..., 32) -> (..., 1); 0 for an all-zero block."""
    table = _levels(x)[_index_table(x)]
    amax, signed = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    signed = torch.where(zero, 1.0, signed)  # any finite scale: the result is dropped, and no NaN is made
    sumqx, sumq2 = _fit(x, w, f32(1, x) / (-signed / f32(KVALUES[0], x)), table)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for k in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = _fit(x, w, f32(k + KVALUES[0], x) / signed, table)
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    return torch.where(zero, 0.0, d)


def iq4_weights(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x (..., sub-blocks, 32) of one super-block each; importance per weight as llama.cpp weighs it."""
    if qw is None:
        return x * x
    size = x.shape[-2] * x.shape[-1]
    sigma2 = x.square().sum(dim=(-2, -1), keepdim=True) * f32(2 / size, x)
    return qw * torch.sqrt(sigma2 + x * x)


def encode_iq4_nl(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x (rows, blocks, 32) -> (rows, blocks, 18): fp16 scale, then 16 bytes of level indices."""
    d = block_scales(x, iq4_weights(x.unsqueeze(-2), qw if qw is None else qw.unsqueeze(-2)).squeeze(-2))
    index = best_index(safe_inverse(d) * x)
    return torch.cat([f16_bytes(d), pack_nibbles(index)], dim=-1)


def encode_iq4_xs(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """x (rows, blocks, 256) -> (rows, blocks, 136): fp16 super-scale d, 8 six-bit sub-scales l (as l + 32, low
    nibbles in scales_l, high bit pairs in the uint16 scales_h), then 128 bytes of level indices."""
    x = x.reshape(*x.shape[:-1], 8, 32)
    scales = block_scales(x, iq4_weights(x, qw if qw is None else qw.reshape(*qw.shape[:-1], 8, 32))).squeeze(-1)
    amax_scale, max_scale = first_absmax(scales)
    d = -torch.where(amax_scale > 0, max_scale, 0.0) / f32(32, x)  # -0.0 for an all-zero super-block, as in C
    sub = torch.round(safe_inverse(d) * scales).clamp(-32, 31)
    dl = (d * sub).unsqueeze(-1)
    index = best_index(safe_inverse(dl) * x)
    code = (sub + 32).to(torch.uint8)
    scales_l = (code[..., 0::2] & 15) | ((code[..., 1::2] & 15) << 4)
    scales_h = ((code >> 4).to(torch.int32) << torch.arange(0, 16, 2, device=x.device, dtype=torch.int32)).sum(-1)
    scales_h = torch.stack([scales_h & 255, scales_h >> 8], dim=-1).to(torch.uint8)
    qs = pack_nibbles(index).flatten(-2)
    return torch.cat([f16_bytes(d), scales_h, scales_l, qs], dim=-1)


def decode_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    d = f16_from_bytes(blocks[:, :2])
    return d * _levels(blocks)[unpack_nibbles(blocks[:, 2:]).long()]


def decode_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    n = blocks.shape[0]
    d = f16_from_bytes(blocks[:, :2])
    scales_h = blocks[:, 2:4].to(torch.int32)
    scales_h = scales_h[:, :1] | (scales_h[:, 1:] << 8)
    high = (scales_h >> torch.arange(0, 16, 2, device=blocks.device, dtype=torch.int32)) & 3
    low = unpack_nibbles(blocks[:, 4:8]).reshape(n, 2, 4).transpose(1, 2).reshape(n, 8)  # byte i: blocks 2i, 2i+1
    sub = ((low.to(torch.int32) | (high << 4)).to(torch.int8) - 32).to(torch.float32)
    dl = (d * sub).unsqueeze(-1)
    q = _levels(blocks)[unpack_nibbles(blocks[:, 8:].reshape(n, 8, 16)).long()]
    return (dl * q).reshape(n, 256)


CODECS: dict[str, Codec] = {
    "IQ4_NL": make_codec("IQ4_NL", 32, 18, encode_iq4_nl, decode_iq4_nl),
    "IQ4_XS": make_codec("IQ4_XS", 256, 136, encode_iq4_xs, decode_iq4_xs),
}
