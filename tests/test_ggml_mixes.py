"""llama-quantize's type per tensor (mixes.py): exact against the two built-in GGUFs (real llama-quantize outputs) and
against the rules of src/llama-quant.cpp (llama.cpp vendored in llama-cpp-python 0.3.36) on synthetic models."""
import functools
import mmap
import random
import struct

import gguf
import pytest

from shrink_core.compression.ggml import mixes
from shrink_core.compression.ggml.mixes import fallback_type, llama_quantize_types
from shrink_core.errors import ShrinkError
from shrink_core.model.load import BUILTINS

_SCALARS = {gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b", gguf.GGUFValueType.UINT16: "<H",
            gguf.GGUFValueType.INT16: "<h", gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
            gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.BOOL: "<?", gguf.GGUFValueType.UINT64: "<Q",
            gguf.GGUFValueType.INT64: "<q", gguf.GGUFValueType.FLOAT64: "<d"}


class _Header:
    """The header of a GGUF file: scalar metadata and tensor infos. (gguf.GGUFReader also parses every vocabulary
    entry into arrays: 14 s for Gemma's 262k tokens, where skipping them takes a fraction of a second.)"""

    def __init__(self, path):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as self.buf:
            self.pos = 0
            assert self._read("<I") == gguf.GGUF_MAGIC and self._read("<I") == 3
            n_tensors, n_kv = self._read("<Q"), self._read("<Q")
            self.fields = {}
            for _ in range(n_kv):
                key, kind = self._string(), gguf.GGUFValueType(self._read("<I"))
                self.fields[key] = self._value(kind)
            self.tensors = []
            for _ in range(n_tensors):
                name, dims = self._string(), self._read("<I")
                ne = [self._read("<Q") for _ in range(dims)]
                kind = gguf.GGMLQuantizationType(self._read("<I"))
                self._read("<Q")  # data offset
                self.tensors.append((name, tuple(reversed(ne)), kind.name))

    def _read(self, fmt):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def _string(self):
        size = self._read("<Q")
        self.pos += size
        return bytes(self.buf[self.pos - size:self.pos]).decode()

    def _value(self, kind):
        if kind == gguf.GGUFValueType.STRING:
            return self._string()
        if kind != gguf.GGUFValueType.ARRAY:
            return self._read(_SCALARS[kind])
        item, count = gguf.GGUFValueType(self._read("<I")), self._read("<Q")
        if item in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[item])
        else:
            for _ in range(count):
                self._value(item)
        return None  # arrays are not needed here


@functools.cache
def _gguf(builtin):
    """(tensors as [(name, torch-order shape)], {name: type}, ftype name, hyperparameters) of a built-in's GGUF."""
    header = _Header(BUILTINS[builtin].gguf_path())
    arch = header.fields["general.architecture"]
    tensors = [(name, shape) for name, shape, _ in header.tensors]
    types = {name: kind for name, _, kind in header.tensors}
    hparams = dict(arch=arch, n_layer=header.fields[f"{arch}.block_count"],
                   n_head=header.fields[f"{arch}.attention.head_count"],
                   n_head_kv=header.fields[f"{arch}.attention.head_count_kv"], has_output="output.weight" in types)
    return tensors, types, mixes.ftype_from_file_type(header.fields["general.file_type"]), hparams


@pytest.mark.parametrize("builtin, ftype", [("gemma3-270m", "Q4_K_M"), ("smollm2-135m", "Q4_1")])
def test_builtin_files_types_are_reproduced_exactly(builtin, ftype):
    tensors, types, file_ftype, hparams = _gguf(builtin)
    assert file_ftype == ftype
    assert llama_quantize_types(tensors, ftype, **hparams) == types


def test_gemma_file_shows_the_fallbacks_and_the_tied_embedding_rule():
    tensors, types, _, hparams = _gguf("gemma3-270m")
    assert not hparams["has_output"] and dict(tensors)["token_embd.weight"] == (262144, 640)
    # no output.weight: token_embd takes the output rule (Q6_K), whose 256-block does not divide 640 -> Q8_0
    assert types["token_embd.weight"] == "Q8_0"
    assert types["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K on 640-wide rows falls back to Q5_0
    assert types["blk.0.attn_output.weight"] == "Q4_K"  # 1024-wide rows take Q4_K itself
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # use_more_bits layer: Q6_K, falling back to Q8_0
    # the Gemma file is in llama-quantize 0.3.36's order (layers numerically, then names), so the counters see the
    # layers in order
    assert list(llama_quantize_types(tensors, "Q4_K_M", **hparams)) == [name for name, _ in tensors]


def test_smollm2_file_comes_from_an_older_llama_quantize_that_kept_the_input_order():
    tensors, _, _, hparams = _gguf("smollm2-135m")
    names = [name for name, _ in tensors]
    # it kept the converter's order (blk.1 then blk.10): 0.3.36 sorts layers numerically; Q4_1 has no
    # order-dependent rule, so its types are the same either way
    assert names.index("blk.10.attn_v.weight") < names.index("blk.2.attn_v.weight")
    assert mixes.llama_order(names) != names


def test_fallbacks_follow_llama_quant_cpp():
    assert [fallback_type(t, 640) for t in ("Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ3_S", "IQ2_XXS")] == [
        "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "IQ4_NL", "IQ4_NL"]
    # 0.3.36 sends Q2_K and Q3_K (and the ternary types) to Q4_0; older llama.cpp sent them to IQ4_NL
    assert [fallback_type(t, 640) for t in ("Q2_K", "Q3_K", "TQ1_0", "TQ2_0")] == ["Q4_0"] * 4
    assert fallback_type("Q4_K", 4096) == "Q4_K" and fallback_type("Q8_0", 640) == "Q8_0"
    # neither the type's block nor its substitute's 32 divides the row: F16
    assert fallback_type("Q4_K", 80) == "F16" and fallback_type("Q6_K", 100) == "F16"
    assert fallback_type("Q4_0", 48) == "F16" and fallback_type("IQ4_NL", 48) == "F16"
    assert fallback_type("F16", 7) == "F16"
    with pytest.raises(ShrinkError, match="no fallback for Q1_0"):
        fallback_type("Q1_0", 96)


def _llama(n_layer=32, n_embd=4096, n_kv=4096, n_ff=11008, vocab=32000, output=True, qkv=False):
    """A Llama's GGUF tensor list (converter names, torch-order shapes)."""
    tensors = [("token_embd.weight", (vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    tensors += [("output.weight", (vocab, n_embd))] if output else []
    for i in range(n_layer):
        p = f"blk.{i}."
        attn = ([(p + "attn_qkv.weight", (n_embd + 2 * n_kv, n_embd))] if qkv else
                [(p + "attn_q.weight", (n_embd, n_embd)), (p + "attn_k.weight", (n_kv, n_embd)),
                 (p + "attn_v.weight", (n_kv, n_embd))])
        tensors += [(p + "attn_norm.weight", (n_embd,)), *attn, (p + "attn_output.weight", (n_embd, n_embd)),
                    (p + "ffn_norm.weight", (n_embd,)), (p + "ffn_gate.weight", (n_ff, n_embd)),
                    (p + "ffn_up.weight", (n_ff, n_embd)), (p + "ffn_down.weight", (n_embd, n_ff))]
    return tensors


LLAMA_7B = dict(arch="llama", n_layer=32, n_head=32, n_head_kv=32, has_output=True)
# use_more_bits on 32 layers: the first and last eighth (0-3, 28-31) and every third between (6, 9, ..., 27)
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def _per_layer(types, part, n_layer=32):
    return [types[f"blk.{i}.{part}.weight"] for i in range(n_layer)]


def test_use_more_bits_on_32_layers():
    assert {i for i in range(32) if mixes.use_more_bits(i, 32)} == MORE_BITS_32


def test_q4_k_m_on_a_32_layer_llama():
    types = llama_quantize_types(_llama(), "Q4_K_M", **LLAMA_7B)
    pattern = ["Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)]
    assert _per_layer(types, "attn_v") == pattern and _per_layer(types, "ffn_down") == pattern
    for part in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert set(_per_layer(types, part)) == {"Q4_K"}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] == types["blk.7.attn_norm.weight"] == "F32"


def test_other_k_mixes_on_a_32_layer_llama():
    q4_k_s = llama_quantize_types(_llama(), "Q4_K_S", **LLAMA_7B)
    assert _per_layer(q4_k_s, "attn_v") == ["Q5_K"] * 4 + ["Q4_K"] * 28  # i_attention_wv < 4
    assert _per_layer(q4_k_s, "ffn_down") == ["Q5_K"] * 4 + ["Q4_K"] * 28  # the first n_layer/8
    q5_k_m = llama_quantize_types(_llama(), "Q5_K_M", **LLAMA_7B)
    assert _per_layer(q5_k_m, "ffn_down") == ["Q6_K" if i in MORE_BITS_32 else "Q5_K" for i in range(32)]
    q3_k_m = llama_quantize_types(_llama(), "Q3_K_M", **LLAMA_7B)
    assert _per_layer(q3_k_m, "attn_v") == ["Q5_K"] * 2 + ["Q4_K"] * 30
    assert _per_layer(q3_k_m, "ffn_down") == ["Q5_K"] * 2 + ["Q4_K"] * 30  # n_layer/16 first, then Q4_K (not falcon)
    assert set(_per_layer(q3_k_m, "attn_output")) == {"Q4_K"} and set(_per_layer(q3_k_m, "attn_q")) == {"Q3_K"}
    q3_k_l = llama_quantize_types(_llama(), "Q3_K_L", **LLAMA_7B)
    assert {q3_k_l[f"blk.5.{p}.weight"] for p in ("attn_v", "ffn_down", "attn_output")} == {"Q5_K"}
    q2_k = llama_quantize_types(_llama(), "Q2_K", **LLAMA_7B)
    assert [q2_k[f"blk.5.{p}.weight"] for p in ("attn_q", "attn_v", "ffn_down", "attn_output")] == [
        "Q2_K", "Q3_K", "Q3_K", "Q3_K"]
    assert q2_k["output.weight"] == "Q6_K" and q2_k["token_embd.weight"] == "Q2_K"
    for ftype, every in (("Q6_K", "Q6_K"), ("Q8_0", "Q8_0"), ("Q4_0", "Q4_0"), ("Q4_1", "Q4_1"), ("Q5_0", "Q5_0")):
        types = llama_quantize_types(_llama(), ftype, **LLAMA_7B)
        assert {t for n, t in types.items() if n.startswith("blk.") and "norm" not in n} == {every}
        assert types["output.weight"] == ("Q8_0" if ftype == "Q8_0" else "Q6_K")


def test_gqa_and_70b_conditions():
    llama3_8b = dict(LLAMA_7B, n_head_kv=8)  # n_gqa = 4
    tensors = _llama(n_kv=1024, n_ff=14336)
    assert set(_per_layer(llama_quantize_types(tensors, "Q2_K", **llama3_8b), "attn_v")) == {"Q4_K"}
    assert set(_per_layer(llama_quantize_types(tensors, "IQ4_XS", **llama3_8b), "attn_v")) == {"Q5_K"}
    assert set(_per_layer(llama_quantize_types(_llama(), "IQ4_XS", **LLAMA_7B), "attn_v")) == {"IQ4_XS"}
    # an 80-layer llama with GQA is llama.cpp's 70B: its Q3_K/Q4_K attn_v are widened to Q5_K
    seventy = _llama(n_layer=80, n_embd=8192, n_kv=1024, n_ff=28672)
    types = llama_quantize_types(seventy, "Q4_K_M", **dict(LLAMA_7B, n_layer=80, n_head=64, n_head_kv=8))
    assert set(_per_layer(types, "attn_v", 80)) == {"Q5_K", "Q6_K"}
    sixty_five = llama_quantize_types(seventy, "Q4_K_M", **dict(LLAMA_7B, n_layer=80, n_head=64, n_head_kv=64))
    assert "Q4_K" in _per_layer(sixty_five, "attn_v", 80)


def test_imatrix_rules():
    tensors = _llama()
    plain, weighted = (llama_quantize_types(tensors, "Q4_0", **LLAMA_7B, imatrix=m) for m in (False, True))
    assert set(_per_layer(plain, "ffn_down")) == {"Q4_0"}
    assert _per_layer(weighted, "ffn_down") == ["Q4_1"] * 4 + ["Q4_0"] * 28  # guards the first ffn_down layers
    assert _per_layer(llama_quantize_types(tensors, "Q5_0", **LLAMA_7B, imatrix=True), "ffn_down")[:5] == [
        "Q5_1"] * 4 + ["Q5_0"]
    iq4 = llama_quantize_types(tensors, "IQ4_XS", **LLAMA_7B)
    assert _per_layer(iq4, "ffn_down") == ["Q5_K"] * 4 + ["IQ4_XS"] * 28  # only without an imatrix
    assert set(_per_layer(llama_quantize_types(tensors, "IQ4_XS", **LLAMA_7B, imatrix=True), "ffn_down")) == {"IQ4_XS"}
    for ftype in ("IQ2_XS", "IQ1_S", "Q2_K_S"):
        with pytest.raises(ShrinkError, match="importance matrix"):
            llama_quantize_types(tensors, ftype, **LLAMA_7B)
        assert llama_quantize_types(tensors, ftype, **LLAMA_7B, imatrix=True)["blk.0.attn_q.weight"] != "F32"
    assert llama_quantize_types(tensors, "IQ2_XS", **LLAMA_7B, dry_run=True)["blk.9.attn_q.weight"] == "IQ2_XS"


def test_counters_follow_llama_order_not_the_given_order():
    tensors = _llama()
    shuffled = tensors[:]
    random.Random(0).shuffle(shuffled)
    assert llama_quantize_types(shuffled, "Q4_K_M", **LLAMA_7B) == llama_quantize_types(tensors, "Q4_K_M", **LLAMA_7B)


def test_attn_qkv_counts_as_attn_v():
    types = llama_quantize_types(_llama(qkv=True), "Q4_K_M", arch="phi3", n_layer=32, n_head=32, n_head_kv=32,
                                 has_output=True)
    assert _per_layer(types, "attn_qkv") == ["Q6_K" if i in MORE_BITS_32 else "Q4_K" for i in range(32)]


def test_tied_embeddings_take_the_output_rule():
    tensors = _llama(output=False)
    tied = llama_quantize_types(tensors, "Q4_K_M", **dict(LLAMA_7B, has_output=False))
    assert tied["token_embd.weight"] == "Q6_K"
    narrow = llama_quantize_types(_llama(n_layer=2, n_embd=576, n_kv=192, n_ff=1536, output=False), "Q4_1",
                                  **dict(LLAMA_7B, n_layer=2, has_output=False))
    assert narrow["token_embd.weight"] == "Q8_0"  # Q6_K does not fit 576-wide rows
    with pytest.raises(ShrinkError, match="has_output"):
        llama_quantize_types(_llama(), "Q4_K_M", **dict(LLAMA_7B, has_output=False))


def test_moe_rules_read_the_layer_from_the_name():
    n_layer, tensors = 4, [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096))]
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors += [(p + "attn_q.weight", (4096, 4096)), (p + "attn_k.weight", (1024, 4096)),
                    (p + "attn_v.weight", (1024, 4096)), (p + "attn_output.weight", (4096, 4096)),
                    (p + "ffn_gate_inp.weight", (8, 4096)), (p + "ffn_down_exps.weight", (8, 4096, 14336)),
                    (p + "ffn_gate_exps.weight", (8, 14336, 4096)), (p + "ffn_up_exps.weight", (8, 14336, 4096))]
    mixtral = dict(arch="llama", n_layer=n_layer, n_head=32, n_head_kv=8, n_expert=8, has_output=True)
    types = llama_quantize_types(tensors, "Q4_K_M", **mixtral)
    assert types["blk.1.attn_v.weight"] == types["blk.1.attn_k.weight"] == "Q8_0"  # 8 experts: cheap to widen
    assert types["blk.1.attn_output.weight"] == "Q5_K" and types["blk.1.ffn_gate_inp.weight"] == "F32"
    assert _per_layer(types, "ffn_down_exps", n_layer) == ["Q6_K" if mixes.use_more_bits(i, 4) else "Q4_K"
                                                           for i in range(n_layer)]
    mxfp4 = llama_quantize_types(tensors, "MXFP4_MOE", **mixtral)
    assert mxfp4["blk.0.ffn_up_exps.weight"] == "MXFP4" and mxfp4["blk.0.attn_q.weight"] == "Q8_0"
    with pytest.raises(ShrinkError, match="outside the model"):
        llama_quantize_types(tensors, "Q4_K_M", **dict(mixtral, n_layer=2))


def test_unquantized_tensors_keep_their_source_type():
    tensors = [("token_embd.weight", (32000, 4096), "F16"), ("blk.0.attn_norm.weight", (4096,), "F32"),
               ("blk.0.attn_q.weight", (4096, 4096), "F16"), ("position_embd.weight", (2048, 4096), "F16"),
               ("blk.0.odd.weight", (1, 4096), "F16")]  # (1, n) is 1-D to ggml
    types = llama_quantize_types(tensors, "Q4_K_M", **dict(LLAMA_7B, n_layer=1))
    assert types == {"position_embd.weight": "F16", "token_embd.weight": "Q4_K", "blk.0.attn_norm.weight": "F32",
                     "blk.0.attn_q.weight": "Q4_K", "blk.0.odd.weight": "F16"}
    assert llama_quantize_types(tensors, "F16", **dict(LLAMA_7B, n_layer=1))["blk.0.attn_q.weight"] == "F16"


def test_ftype_names_and_ids():
    needed = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q3_K_L", "Q2_K", "IQ4_XS", "Q4_0",
              "Q4_1", "Q5_0")
    assert all(mixes.FTYPES[name] for name in needed)
    for name, number in mixes.FILE_TYPE_IDS.items():
        member = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
        if hasattr(gguf.LlamaFileType, member):  # gguf-py 0.19 lacks Q2_0
            assert getattr(gguf.LlamaFileType, member) == number, name
    assert mixes.resolve_ftype("q4_k") == "Q4_K_M" and mixes.ftype_from_file_type(15) == "Q4_K_M"
    with pytest.raises(ShrinkError, match="not a llama-quantize file type"):
        llama_quantize_types(_llama(n_layer=1), "Q4_K_X", **dict(LLAMA_7B, n_layer=1))
