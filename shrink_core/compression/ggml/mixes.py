"""llama-quantize's type per tensor for a file type (Q4_K_M, Q4_1, ...), reproduced exactly in pure Python.

The reference is `llama_tensor_get_type` in src/llama-quant.cpp of the llama.cpp vendored in llama-cpp-python 0.3.36
(the version this project builds its tools from): the mix rules per tensor category (attn_v / ffn_down / attn_output /
attn_qkv, with the layer counters and `use_more_bits`), the output rule (applied to token_embd when the model has no
output.weight), the GQA / 70B / MoE conditions, the imatrix-dependent rules, and the fallback for row widths a type's
block does not divide. No `--tensor-type`, `--pure`, `--output-tensor-type` or `--token-embedding-type` overrides.

Shapes are PyTorch order, outermost first: (rows, cols), or (experts, rows, cols); llama.cpp's ne[0] is `cols`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from shrink_core.errors import ShrinkError

# llama-quantize's file types: (name, general.file_type id, default tensor type, its help line). The help of this
# llama.cpp version gives sizes and perplexity on Llama-3-8B (not bits per weight on a 7B) for most of them.
_FTYPE_TABLE = (
    ("Q1_0", 40, "Q1_0", "1.125 bpw quantization"),
    ("Q2_0", 41, "Q2_0", "2.25 bpw quantization (group 64)"),
    ("Q4_0", 2, "Q4_0", "4.34G, +0.4685 ppl @ Llama-3-8B"),
    ("Q4_1", 3, "Q4_1", "4.78G, +0.4511 ppl @ Llama-3-8B"),
    ("MXFP4_MOE", 38, "MXFP4", "MXFP4 MoE"),
    ("Q5_0", 8, "Q5_0", "5.21G, +0.1316 ppl @ Llama-3-8B"),
    ("Q5_1", 9, "Q5_1", "5.65G, +0.1062 ppl @ Llama-3-8B"),
    ("IQ2_XXS", 19, "IQ2_XXS", "2.06 bpw quantization"),
    ("IQ2_XS", 20, "IQ2_XS", "2.31 bpw quantization"),
    ("IQ2_S", 28, "IQ2_XS", "2.5 bpw quantization"),
    ("IQ2_M", 29, "IQ2_S", "2.7 bpw quantization"),
    ("IQ1_S", 24, "IQ1_S", "1.56 bpw quantization"),
    ("IQ1_M", 31, "IQ1_M", "1.75 bpw quantization"),
    ("TQ1_0", 36, "TQ1_0", "1.69 bpw ternarization"),
    ("TQ2_0", 37, "TQ2_0", "2.06 bpw ternarization"),
    ("Q2_K", 10, "Q2_K", "2.96G, +3.5199 ppl @ Llama-3-8B"),
    ("Q2_K_S", 21, "Q2_K", "2.96G, +3.1836 ppl @ Llama-3-8B"),
    ("IQ3_XXS", 23, "IQ3_XXS", "3.06 bpw quantization"),
    ("IQ3_S", 26, "IQ3_S", "3.44 bpw quantization"),
    ("IQ3_M", 27, "IQ3_S", "3.66 bpw quantization mix"),
    ("IQ3_XS", 22, "IQ3_S", "3.3 bpw quantization"),
    ("Q3_K_S", 11, "Q3_K", "3.41G, +1.6321 ppl @ Llama-3-8B"),
    ("Q3_K_M", 12, "Q3_K", "3.74G, +0.6569 ppl @ Llama-3-8B"),
    ("Q3_K_L", 13, "Q3_K", "4.03G, +0.5562 ppl @ Llama-3-8B"),
    ("IQ4_NL", 25, "IQ4_NL", "4.50 bpw non-linear quantization"),
    ("IQ4_XS", 30, "IQ4_XS", "4.25 bpw non-linear quantization"),
    ("Q4_K_S", 14, "Q4_K", "4.37G, +0.2689 ppl @ Llama-3-8B"),
    ("Q4_K_M", 15, "Q4_K", "4.58G, +0.1754 ppl @ Llama-3-8B"),
    ("Q5_K_S", 16, "Q5_K", "5.21G, +0.1049 ppl @ Llama-3-8B"),
    ("Q5_K_M", 17, "Q5_K", "5.33G, +0.0569 ppl @ Llama-3-8B"),
    ("Q6_K", 18, "Q6_K", "6.14G, +0.0217 ppl @ Llama-3-8B"),
    ("Q8_0", 7, "Q8_0", "7.96G, +0.0026 ppl @ Llama-3-8B"),
    ("F16", 1, "F16", "14.00G, +0.0020 ppl @ Mistral-7B"),
    ("BF16", 32, "BF16", "14.00G, -0.0050 ppl @ Mistral-7B"),
    ("F32", 0, "F32", "26.00G @ 7B"),
)
FTYPES: dict[str, str] = {name: help_line for name, _, _, help_line in _FTYPE_TABLE}
FILE_TYPE_IDS: dict[str, int] = {name: file_type for name, file_type, _, _ in _FTYPE_TABLE}
DEFAULT_TYPES: dict[str, str] = {name: default for name, _, default, _ in _FTYPE_TABLE}
FTYPE_ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # llama-quantize accepts these too

# Types this llama.cpp has that gguf-py 0.19 does not list: their block widths.
_EXTRA_BLOCKS = {"Q2_0": 64}
# tensor_type_fallback: what a type becomes when its block does not divide the row width.
_FALLBACK = {
    **dict.fromkeys(("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_XS"), "IQ4_NL"),
    **dict.fromkeys(("Q2_0", "Q2_K", "Q3_K", "TQ1_0", "TQ2_0"), "Q4_0"),
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}
# Types llama-quantize refuses to produce without an importance matrix (tensor_requires_imatrix).
_NEEDS_IMATRIX = frozenset(("IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"))
# The ftypes whose non-embedding mix is the 1-2 bit IQ group of rules.
_IQ_LOW = frozenset(("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"))
# Model types: the layer count that makes llama.cpp call a model of these architectures "70B".
_LAYERS_70B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}
# Substrings of names llama-quantize never quantizes (tensor_allows_quantization), besides norms and 1-D tensors.
_KEPT_PARTS = (
    "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
    "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd",
    "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook",
    "mm.a.code_embd",
    *(f"time_mix_{part}.weight" for part in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2",
                                             "decay_w1", "decay_w2", "lerp_fused")),
)
_KEPT_PARTS_GLM5_NEXT = (
    "hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate", "indexer_compressor_ape",
    "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight", "ssm_beta.weight",
    "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight",
)
# tensor_get_category: first match wins, in this order.
_CATEGORY_PARTS = (
    ("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"),
)
_ATTN_V_LIKE = frozenset(("attn_v", "attn_qkv", "attn_kv_b"))
_LAYER = re.compile(r"blk\.\s*([+-]?\d+)")  # sscanf("blk.%d."): counts once the number is read


def block_size(type_name: str) -> int:
    """Weights per block of a ggml type (1 for float and integer types)."""
    if type_name in _EXTRA_BLOCKS:
        return _EXTRA_BLOCKS[type_name]
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][0]
    except KeyError:
        raise ShrinkError(f"'{type_name}' is not a ggml type; use a name such as Q4_K or Q8_0.") from None


def is_quantized(type_name: str) -> bool:
    return block_size(type_name) > 1


def fallback_type(type_name: str, cols: int) -> str:
    """The type llama-quantize stores a tensor of row width `cols` in when `type_name` is requested: the type itself,
    its smaller-block substitute, or F16 when even that block does not divide the row."""
    block = block_size(type_name)
    if cols % block == 0:
        return type_name
    substitute = _FALLBACK.get(type_name)
    if substitute is None:
        if block > 32:
            raise ShrinkError(f"llama.cpp has no fallback for {type_name} on rows of {cols} weights (not a multiple of "
                              f"{block}); choose a type whose block divides the row width.")
        substitute = type_name  # already a 32-wide block: nothing smaller to go to, F16 below
    return substitute if cols % block_size(substitute) == 0 else "F16"


def resolve_ftype(name: str) -> str:
    """The canonical file-type name for what llama-quantize accepts (case-insensitive, with its Q3_K/Q4_K/Q5_K
    aliases)."""
    upper = name.upper()
    upper = FTYPE_ALIASES.get(upper, upper)
    if upper not in FTYPES:
        raise ShrinkError(f"'{name}' is not a llama-quantize file type; use one of {', '.join(FTYPES)}.")
    return upper


def ftype_from_file_type(file_type: int) -> str:
    """The file-type name for a GGUF's general.file_type."""
    for name, number in FILE_TYPE_IDS.items():
        if number == file_type:
            return name
    raise ShrinkError(f"general.file_type {file_type} is not one llama-quantize writes; check the GGUF's metadata.")


def tensor_category(name: str) -> str:
    """llama-quantize's broad category of a tensor name ("other" for those no rule names)."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((category for part, category in _CATEGORY_PARTS if part in name), "other")


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """ggml's dimension count: trailing (outer) sizes of 1 do not count, so (1, 576) is 1-D."""
    outer_first = tuple(shape)
    for index, size in enumerate(outer_first[:-1]):
        if size > 1:
            return len(outer_first) - index
    return 1


def allows_quantization(name: str, shape: tuple[int, ...], arch: str) -> bool:
    """Whether llama-quantize quantizes this tensor at all (otherwise it is copied in its source type)."""
    if ggml_n_dims(shape) < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    kept = _KEPT_PARTS + (_KEPT_PARTS_GLM5_NEXT if arch == "glm5-next" else ())
    return not any(part in name for part in kept)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The first and last eighth of the layers, and every third one between (C integer division)."""
    eighth = n_layers // 8
    return i_layer < eighth or i_layer >= 7 * n_layers // 8 or _c_mod(i_layer - eighth, 3) == 2


def _c_mod(a: int, b: int) -> int:
    """C's % (the sign of the dividend), which Python's % is not for negative a."""
    return a - b * int(a / b)


def _block_layer(name: str) -> int:
    """The layer in "blk.N." as llama.cpp's sscanf reads it, -1 when the name has none."""
    match = _LAYER.match(name)
    return int(match.group(1)) if match else -1


def llama_order(names: list[str]) -> list[str]:
    """llama-quantize's processing (and output file) order: by layer (non-layer tensors first), then by name."""
    return sorted(names, key=lambda name: (_block_layer(name), name.encode()))


def is_70b(arch: str, n_layer: int, n_head: int, n_head_kv: int, n_expert: int = 0) -> bool:
    """Whether llama.cpp's model loader types this model 70B (it widens attn_v then)."""
    if _LAYERS_70B.get(arch) != n_layer:
        return False
    return arch != "llama" or (n_expert != 8 and n_head != n_head_kv)


@dataclass(frozen=True)
class MixModel:
    """What llama-quantize's rules read about the model."""

    arch: str
    n_layer: int  # block_count (llama.cpp's n_layer_all)
    n_gqa: int  # n_head // n_head_kv, 0 without KV heads
    n_expert: int
    is_70b: bool
    tied: bool  # no output.weight: token_embd takes the output rule
    imatrix: bool
    n_attention_wv: int  # attn_v-like tensors in the whole model


@dataclass(frozen=True)
class MixTensor:
    """One quantized tensor as the rules see it: its counters are its index among the tensors of its category that
    llama-quantize handled before it."""

    name: str
    category: str
    cols: int
    ne2: int  # experts of a 3-D tensor (1 otherwise)
    i_attention_wv: int
    i_ffn: int  # index among tensors of its ffn category (down, gate or up)


def _layer_of(model: MixModel, tensor: MixTensor) -> int:
    """The layer an ffn rule uses: the counter, or for MoE models the layer in the name (experts are not in order)."""
    if model.n_expert <= 1:
        return tensor.i_ffn
    layer = _block_layer(tensor.name)
    if layer == -1 and _LAYER.match(tensor.name) is None:
        raise ShrinkError(f"Cannot tell the layer of MoE tensor {tensor.name}; name it blk.<layer>.<...>.")
    if not 0 <= layer < model.n_layer:
        raise ShrinkError(f"Tensor {tensor.name} is in layer {layer}, outside the model's {model.n_layer} layers; "
                          f"pass the model's block_count as n_layer.")
    return layer


def _output_type(ftype: str, default: str, model: MixModel, tensor: MixTensor) -> str:
    """output.weight, and token_embd when it doubles as the output."""
    if ftype == "MXFP4_MOE" or model.arch == "falcon" or tensor.cols % block_size(default) != 0:
        return "Q8_0"
    if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
        return "Q5_K"
    return default if default == "Q8_0" else "Q6_K"


def _token_embd_type(ftype: str, default: str) -> str:
    if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
        return "Q2_K"
    if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
        return "IQ3_S"
    if ftype in ("TQ1_0", "TQ2_0", "Q2_0"):
        return "Q4_K"
    return default


def _mxfp4_moe_type(model: MixModel, tensor: MixTensor) -> str:
    """Expert tensors (3-D) in MXFP4, everything else Q8_0."""
    expert_role = tensor.category in ("ffn_up", "ffn_gate", "ffn_down")
    if tensor.ne2 > 1 and (model.arch != "bailingmoe3" or expert_role):
        return "MXFP4"
    return "Q8_0"


def _iq_low_type(ftype: str, default: str, model: MixModel, tensor: MixTensor) -> str:
    """The 1-2 bit IQ mixes."""
    wide = ftype in ("IQ2_S", "IQ2_M")
    if tensor.category in _ATTN_V_LIKE:
        if model.n_gqa >= 4 or model.n_expert >= 4:
            return "Q4_K"
        return "IQ3_S" if wide else "Q2_K"
    if model.n_expert == 8 and tensor.category == "attn_k":
        return "Q4_K"
    if tensor.category == "ffn_down":
        if tensor.i_ffn < model.n_layer // 8:
            return "IQ3_S" if wide else "Q2_K"
        return default
    if tensor.category == "attn_output":
        if model.n_expert == 8:
            return "Q5_K"
        if ftype in ("IQ1_S", "IQ1_M"):
            return "IQ2_XXS"
        if wide:
            return "IQ3_S"
    return default


def _attn_v_type(ftype: str, default: str, model: MixModel, tensor: MixTensor) -> str:
    """attn_v, attn_qkv and attn_kv_b: the tensors most sensitive to quantization."""
    gqa4, i_wv = model.n_gqa >= 4, tensor.i_attention_wv
    new = default
    if ftype == "Q2_K":
        new = "Q4_K" if gqa4 else "Q3_K"
    elif ftype == "Q2_K_S" and gqa4:
        new = "Q4_K"
    elif ftype == "IQ3_XXS":
        new = "Q4_K" if gqa4 else ("IQ3_XXS" if model.imatrix else "IQ3_S")
    elif (ftype in ("IQ3_XS", "IQ3_S") and gqa4) or ftype == "IQ3_M":
        new = "Q4_K"
    elif ftype == "Q3_K_M":
        new = "Q5_K" if i_wv < 2 else "Q4_K"
    elif ftype == "Q3_K_L" or (ftype in ("IQ4_NL", "IQ4_XS") and gqa4):
        new = "Q5_K"
    elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_wv, model.n_attention_wv):
        new = "Q6_K"
    elif ftype == "Q4_K_S" and i_wv < 4:
        new = "Q5_K"
    if model.is_70b and new in ("Q3_K", "Q4_K"):
        new = "Q5_K"  # 8 heads share attn_v in a 70B: more bits cost little
    return "Q8_0" if model.n_expert == 8 else new


def _attn_k_type(ftype: str, default: str, model: MixModel) -> str:
    if model.n_expert == 8:
        return "Q8_0"
    return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, default)


def _ffn_down_type(ftype: str, default: str, model: MixModel, tensor: MixTensor) -> str:
    layer, n_layer = _layer_of(model, tensor), model.n_layer
    falcon, first_eighth, more = model.arch == "falcon", layer < n_layer // 8, use_more_bits(layer, n_layer)
    if ftype == "Q2_K":
        return "Q3_K"
    if ftype == "Q2_K_S":
        return "Q4_K" if first_eighth else default
    if ftype == "IQ3_XXS" and not model.imatrix:
        return "Q4_K" if first_eighth else "Q3_K"
    if ftype == "Q3_K_M":
        if layer < n_layer // 16:
            return "Q5_K"
        return "Q4_K" if not falcon or more else "Q3_K"
    if ftype == "IQ3_M" and (first_eighth or (model.n_expert == 8 and more)):
        return "Q4_K"
    if ftype == "Q3_K_L":
        return "Q4_K" if falcon else "Q5_K"
    if ftype == "Q4_K_M":
        if falcon:
            return "Q6_K" if layer < n_layer // 16 else ("Q5_K" if more else "Q4_K")
        return "Q6_K" if more else default
    if first_eighth and ftype in ("IQ4_NL", "IQ4_XS") and not model.imatrix:
        return "Q5_K"
    if ftype == "Q5_K_M" and more:
        return "Q6_K"
    if ftype == "Q4_K_S" and not falcon and first_eighth:
        return "Q5_K"
    if ftype in ("Q4_0", "Q5_0") and model.imatrix and first_eighth:
        return "Q4_1" if ftype == "Q4_0" else "Q5_1"  # guards the first ffn_down layers against outliers
    return default


_ATTN_OUTPUT_MOE8_Q5_K = frozenset(("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                                    "IQ3_S", "IQ3_M", "IQ4_XS"))
_ATTN_OUTPUT_DENSE = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}


def _attn_output_type(ftype: str, default: str, model: MixModel) -> str:
    if model.arch == "falcon":
        return "Q4_K" if ftype == "Q3_K_L" else default
    if model.n_expert == 8:
        return "Q5_K" if ftype in _ATTN_OUTPUT_MOE8_Q5_K else default
    return _ATTN_OUTPUT_DENSE.get(ftype, default)


def _ffn_gate_up_type(ftype: str, default: str, model: MixModel, tensor: MixTensor) -> str:
    layer, n_layer = _layer_of(model, tensor), model.n_layer
    if ftype == "IQ3_XS" and n_layer // 8 <= layer < 7 * n_layer // 8:
        return "IQ3_XXS"
    return default


def mix_type(ftype: str, model: MixModel, tensor: MixTensor) -> str:
    """The type the mix asks for (llama_tensor_get_type_impl), before the row-width fallback."""
    default, category = DEFAULT_TYPES[ftype], tensor.category
    if model.arch == "glm5-next" and any(part in tensor.name for part in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        return "Q8_0"  # never below Q8_0 for these in glm5-next
    if category == "output" or (model.tied and category == "token_embd"):
        return _output_type(ftype, default, model, tensor)
    if ftype == "MXFP4_MOE":
        return _mxfp4_moe_type(model, tensor)
    if category == "token_embd":
        return _token_embd_type(ftype, default)
    if ftype in _IQ_LOW:
        return _iq_low_type(ftype, default, model, tensor)
    if category in _ATTN_V_LIKE:
        # attn_qkv and attn_kv_b take the attn_v rules: llama.cpp's own attn_qkv branch comes after this one and never
        # runs, so it is left out here
        return _attn_v_type(ftype, default, model, tensor)
    if category == "attn_k":
        return _attn_k_type(ftype, default, model)
    if category == "attn_q":
        return {"IQ3_XS": "IQ3_XXS", "IQ3_XXS": "IQ2_S"}.get(ftype, default)
    if category == "ffn_down":
        return _ffn_down_type(ftype, default, model, tensor)
    if category == "attn_output":
        return _attn_output_type(ftype, default, model)
    if category in ("ffn_gate", "ffn_up"):
        return _ffn_gate_up_type(ftype, default, model, tensor)
    return default


def _requires_imatrix(name: str, type_name: str, ftype: str) -> bool:
    if tensor_category(name) in ("output", "token_embd"):
        return False
    return type_name in _NEEDS_IMATRIX or (type_name == "Q2_K" and ftype == "Q2_K_S")


def _cols_and_experts(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[-1], (shape[-3] if len(shape) >= 3 else 1)


def llama_quantize_types(tensors, ftype: str, *, arch: str, n_layer: int, n_head: int, n_head_kv: int,
                         n_expert: int = 0, has_output: bool, imatrix: bool = False,
                         dry_run: bool = False) -> dict[str, str]:
    """{gguf name: type} that llama-quantize writes for `ftype`, in its processing (= output file) order.

    `tensors` is [(gguf_name, shape)] (shape outermost first, so ne[0] is shape[-1]), optionally
    (gguf_name, shape, source_type) for what the unquantized file holds; tensors llama-quantize does not quantize
    (norms, 1-D, router weights, ...) keep that type, "F32" unless given. `n_layer` is the GGUF's block_count.
    Raises ShrinkError where llama-quantize refuses: a type that needs an imatrix without one (unless `dry_run`, which
    like `llama-quantize --dry-run` reports the types regardless), a row width with no fallback, an MoE tensor whose
    layer cannot be read."""
    ftype = resolve_ftype(ftype)
    if n_layer <= 0:
        raise ShrinkError(f"n_layer must be the model's block count (got {n_layer}); read it from the GGUF metadata.")
    entries = {item[0]: (tuple(int(size) for size in item[1]), item[2] if len(item) > 2 else "F32") for item in tensors}
    if "output.weight" in entries and not has_output:
        raise ShrinkError("The tensor list has output.weight but has_output is False; pass has_output=True.")
    model = MixModel(arch=arch, n_layer=n_layer, n_gqa=n_head // n_head_kv if n_head_kv else 0, n_expert=n_expert,
                     is_70b=is_70b(arch, n_layer, n_head, n_head_kv, n_expert), tied=not has_output, imatrix=imatrix,
                     n_attention_wv=sum(tensor_category(name) in _ATTN_V_LIKE for name in entries))
    default = DEFAULT_TYPES[ftype]
    seen = {"attn_wv": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}  # the rules' running counters
    types = {}
    for name in llama_order(list(entries)):
        shape, source = entries[name]
        if not allows_quantization(name, shape, arch):
            types[name] = source
            continue
        if not is_quantized(default):
            types[name] = default
            continue
        category = tensor_category(name)
        cols, ne2 = _cols_and_experts(shape)
        counter = "attn_wv" if category in _ATTN_V_LIKE else category
        tensor = MixTensor(name, category, cols, ne2, seen["attn_wv"], seen.get(category, 0))
        if counter in seen:
            seen[counter] += 1
        types[name] = fallback_type(mix_type(ftype, model, tensor), cols)
        if not (imatrix or dry_run) and _requires_imatrix(name, types[name], ftype):
            raise ShrinkError(f"{ftype} stores {name} as {types[name]}, which llama-quantize only makes with an "
                              f"importance matrix; compute one (llama-imatrix) and pass imatrix=True, or choose another "
                              f"file type.")
    return types
