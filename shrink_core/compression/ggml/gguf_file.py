"""A compressed model as a GGUF file that llama.cpp loads, and the inverse (for checks).

`write_gguf` takes the model (HF layout, HF parameter names), the tensors the engine produced (llama.cpp block bytes,
or floats to store as F32 / F16 / BF16) and writes every other parameter as F32, converted the way llama.cpp's
`convert_hf_to_gguf.py` converts it:
- llama: the rows of q_proj / k_proj are permuted per head (llama.cpp's rotary layout). On block bytes that is a
  permutation of whole rows, so it is exact for any block type.
- Gemma 3: norms are stored as 1 + w (HF's Gemma3RMSNorm computes x * (1 + w); llama.cpp multiplies by the stored
  value).
- a tied lm_head is not written: llama.cpp uses token_embd when output.weight is absent.
Metadata comes from the GGUF file the model was loaded from (hyper-parameters and every tokenizer.* key, copied
exactly) or, for a Hugging Face directory, is built from config.json and tokenizer files as the converter does.
`read_gguf_weights` dequantizes a file with gguf-py and undoes both conversions: HF names and layout, float32.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from shrink_core.errors import ShrinkError

FLOAT_TYPES = ("F32", "F16", "BF16")
QType = gguf.GGMLQuantizationType
VType = gguf.GGUFValueType


@dataclass(frozen=True, eq=False)
class GgufTensor:
    """One tensor as it goes into the file, in HF layout (rows in HF order; the writer permutes what llama.cpp needs).

    type_name: llama.cpp's type name ("Q4_K", "Q8_0", "IQ4_XS", or "F32" / "F16" / "BF16").
    shape: the logical shape, (rows, cols) for a matrix.
    data: uint8 (rows, row_bytes) of whole blocks for a block type; float values of `shape` for a float type.
    """

    type_name: str
    shape: tuple[int, ...]
    data: torch.Tensor

    def __post_init__(self):
        object.__setattr__(self, "type_name", self.type_name.upper())  # "q8_0" and "Q8_0" name one type
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @classmethod
    def blocks(cls, data: torch.Tensor, type_name: str, shape: tuple[int, int]) -> GgufTensor:
        return cls(type_name, tuple(shape), data)

    @classmethod
    def floats(cls, values: torch.Tensor, type_name: str = "F16") -> GgufTensor:
        return cls(type_name, tuple(values.shape), values)

    @property
    def is_float(self) -> bool:
        return self.type_name in FLOAT_TYPES


@dataclass(frozen=True)
class ArchRules:
    """What differs between HF and llama.cpp for one architecture."""

    name: str  # llama.cpp's architecture name: "llama", "gemma3"
    arch: gguf.MODEL_ARCH
    permute_qk: bool  # llama.cpp's rotary layout for q/k rows (llama only)
    norm_shift: float  # added to HF "*norm.weight" values on the way to the file
    block_params: tuple[str, ...]  # HF parameter names inside block i (for reading a file back without a model)


_LLAMA_BLOCK = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    *(f"self_attn.{p}_proj.{s}" for p in "qkvo" for s in ("weight", "bias")),
    *(f"mlp.{p}_proj.{s}" for p in ("gate", "up", "down") for s in ("weight", "bias")),
)
ARCHS = {
    "llama": ArchRules("llama", gguf.MODEL_ARCH.LLAMA, True, 0.0, _LLAMA_BLOCK),
    "gemma3": ArchRules("gemma3", gguf.MODEL_ARCH.GEMMA3, False, 1.0, _LLAMA_BLOCK + (
        "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
        "self_attn.q_norm.weight", "self_attn.k_norm.weight")),
}
# HF model_type (or GGUF architecture) -> llama.cpp architecture; Mistral converts as llama
ARCH_OF = {"llama": "llama", "mistral": "llama", "gemma3": "gemma3", "gemma3_text": "gemma3"}
GLOBAL_PARAMS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
EXTRA_SOURCE_TENSORS = ("rope_freqs.weight",)  # not model parameters; kept from the source file
# source keys that describe the source file, not the model: rewritten or dropped
DROPPED_KEYS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version",
                "general.alignment", "quantize.", "shrink.", "split.")
STRUCTURAL_KEYS = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                   "attention.head_count_kv", "vocab_size")


def arch_rules(model_type: str) -> ArchRules:
    name = ARCH_OF.get(model_type)
    if name is None:
        known = ", ".join(sorted(ARCH_OF))
        raise ShrinkError(f"Writing GGUF for model type '{model_type}' is not supported; supported types: {known}.")
    return ARCHS[name]


# ---------------------------------------------------------------- names and layout


def gguf_names(rules: ArchRules, hf_names: Iterable[str], n_blocks: int) -> dict[str, str | None]:
    """HF parameter name -> GGUF tensor name (None where gguf-py's map for the architecture has none)."""
    table = gguf.get_tensor_name_map(rules.arch, n_blocks)
    return {name: table.get_name(name, try_suffixes=(".weight", ".bias")) for name in hf_names}


def hf_names_of(rules: ArchRules, n_blocks: int) -> dict[str, str]:
    """GGUF tensor name -> HF parameter name, for every parameter this architecture can have."""
    candidates = [*GLOBAL_PARAMS, *(f"model.layers.{i}.{p}" for i in range(n_blocks) for p in rules.block_params)]
    return {g: h for h, g in gguf_names(rules, candidates, n_blocks).items() if g is not None}


def qk_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Indices `idx` with gguf_rows = hf_rows[idx]: within each head, llama.cpp interleaves the two rotary halves."""
    if rows % (2 * n_head):
        raise ShrinkError(f"A q/k projection with {rows} rows does not split into {n_head} heads of even size; "
                          "check num_attention_heads / num_key_value_heads in the model's config.")
    return torch.arange(rows).reshape(n_head, 2, rows // n_head // 2).transpose(1, 2).reshape(-1)


def _qk_heads(hf_name: str, rules: ArchRules, n_head: int, n_head_kv: int) -> int | None:
    if not rules.permute_qk:
        return None
    if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
        return n_head
    if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
        return n_head_kv
    return None


def _shift(hf_name: str, rules: ArchRules) -> float:
    return rules.norm_shift if hf_name.endswith("norm.weight") else 0.0


def _qtype(type_name: str) -> QType:
    try:
        return QType[type_name]
    except KeyError:
        raise ShrinkError(f"'{type_name}' is not a llama.cpp tensor type; use a name such as Q4_K, Q8_0 or F16.") \
            from None


# ---------------------------------------------------------------- tensors into the file


def _float_array(values: torch.Tensor, type_name: str) -> tuple[np.ndarray, QType | None]:
    values = values.detach().to("cpu", torch.float32).contiguous()
    if type_name == "F32":
        return values.numpy(), None
    if type_name == "F16":
        return values.to(torch.float16).numpy(), None
    return values.to(torch.bfloat16).view(torch.uint8).numpy(), QType.BF16  # bf16 as raw bytes: numpy has no bf16


def _given_array(hf_name: str, given: GgufTensor, shape: tuple[int, ...], heads: int | None,
                 shift: float) -> tuple[np.ndarray, QType | None]:
    qtype = _qtype(given.type_name)
    if tuple(given.shape) != shape:
        raise ShrinkError(f"The tensor given for {hf_name} has shape {tuple(given.shape)} but the model's parameter "
                          f"has {shape}; give it in the model's (HF) layout.")
    if given.is_float:
        if len(shape) == 1 and given.type_name != "F32":
            raise ShrinkError(f"{hf_name} is 1-D, and llama.cpp reads 1-D tensors (norms, biases) as F32 only; "
                              "give it as F32 or leave it out.")
        if tuple(given.data.shape) != shape or not given.data.is_floating_point():
            raise ShrinkError(f"The {given.type_name} tensor for {hf_name} must hold float values of shape {shape}.")
        values = given.data.detach().to(torch.float32)
        values = values + shift if shift else values
        if heads is not None:
            values = values[qk_row_order(shape[0], heads)]
        return _float_array(values, given.type_name)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if len(shape) != 2 or shape[1] % block:
        raise ShrinkError(f"{hf_name} {shape} cannot be stored as {given.type_name}: its rows must be a multiple of "
                          f"{block} wide; choose another type for it.")
    if shift:
        raise ShrinkError(f"{hf_name} is a norm llama.cpp stores with an offset of {shift:g}; give it as F32.")
    expected = (shape[0], shape[1] // block * type_size)
    if given.data.dtype != torch.uint8 or tuple(given.data.shape) != expected:
        raise ShrinkError(f"The {given.type_name} bytes for {hf_name} must be uint8 of shape {expected} (whole "
                          f"blocks per row), not {given.data.dtype} {tuple(given.data.shape)}.")
    data = given.data.detach().cpu()
    data = data if heads is None else data[qk_row_order(shape[0], heads)]
    return data.contiguous().numpy(), qtype


def _param_array(param: torch.Tensor, heads: int | None, shift: float) -> np.ndarray:
    values = param.detach().to("cpu", torch.float32)
    values = values + shift if shift else values
    if heads is not None:
        values = values[qk_row_order(param.shape[0], heads)]
    return values.contiguous().numpy()


def _same(a: GgufTensor | None, b: GgufTensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.type_name == b.type_name
                      and a.data.dtype == b.data.dtype and torch.equal(a.data, b.data))


def _tied(state: Mapping[str, torch.Tensor], emb: str | None, out: str | None) -> bool:
    return emb is not None and out is not None and state[emb].data_ptr() == state[out].data_ptr()


def file_type(types: Mapping[str, tuple[str, int, int]]) -> int | None:
    """general.file_type: the MOSTLY_* of the type that holds most weights of the block matrices (the embedding and
    head are usually kept wider); None when no MOSTLY_* matches (llama.cpp then guesses from the tensors)."""
    weights: dict[str, int] = {}
    for name, (type_name, numel, ndim) in types.items():
        if ndim == 2 and name.startswith("blk."):
            weights[type_name] = weights.get(type_name, 0) + numel
    if not weights:
        weights = {t: n for t, n, d in types.values() if d == 2} or {"F32": 1}
    top = max(weights, key=weights.get)
    if top == "F32":
        return int(gguf.LlamaFileType.ALL_F32)
    for candidate in (f"MOSTLY_{top}", f"MOSTLY_{top}_M"):  # Q4_K -> MOSTLY_Q4_K_M: K-quants have S/M/L mixes
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    return None


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Kv:
    value: object
    type: VType
    sub_type: VType | None = None


def _field_kv(field) -> Kv:
    """A reader field as the writer takes it; strings stay raw bytes, so the copy is byte for byte."""
    main = field.types[0]
    if main == VType.ARRAY:
        if len(field.types) != 2:
            raise ShrinkError(f"The source key {field.name} is a nested array, which this writer cannot copy; "
                              "re-export the source with a current llama.cpp converter.")
        sub = field.types[1]
        if sub == VType.STRING:
            return Kv([bytes(field.parts[i]) for i in field.data], main, sub)
        values = np.concatenate([field.parts[i] for i in field.data]) if len(field.data) else np.array([])
        return Kv(values.tolist(), main, sub)
    part = field.parts[field.data[0]]
    return Kv(bytes(part) if main == VType.STRING else part[0].item(), main)


def source_kv(reader) -> dict[str, Kv]:
    return {key: _field_kv(field) for key, field in reader.fields.items() if not key.startswith(DROPPED_KEYS)}


def _scratch_kv(arch_name: str, fill) -> dict[str, Kv]:
    """Key/values as gguf-py's named setters write them (right keys and types), without a file."""
    scratch = gguf.GGUFWriter(None, arch_name)
    fill(scratch)
    return {k: Kv(v.value, v.type, v.sub_type) for k, v in scratch.kv_data[0].items() if k != "general.architecture"}


def _rope(config, kind: str) -> dict:
    params = getattr(config, "rope_parameters", None) or {}
    params = params.get(kind, params)  # Gemma 3 keeps one set per attention kind, llama one for all
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return {**params, "rope_theta": theta}


def config_hparams(config, rules: ArchRules) -> dict[str, Kv]:
    """Hyper-parameters from an HF config, as llama.cpp's converter writes them for this architecture."""
    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    full = _rope(config, "full_attention")
    rope_type = full.get("rope_type") or "default"
    if rope_type not in ("default", "linear"):
        raise ShrinkError(f"The model's RoPE scaling '{rope_type}' is not supported by the GGUF writer; export from "
                          "its original GGUF file instead.")

    def fill(w: gguf.GGUFWriter) -> None:
        w.add_context_length(config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(n_head)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        if full["rope_theta"] is not None:
            w.add_rope_freq_base(full["rope_theta"])
        if rope_type == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(full["factor"])
        if rules.name == "llama":
            w.add_vocab_size(config.vocab_size)
            w.add_rope_dimension_count(head_dim)
            if head_dim != config.hidden_size // n_head:
                w.add_key_length(head_dim)
                w.add_value_length(head_dim)
        else:  # gemma3
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
            if (swa_theta := _rope(config, "sliding_attention")["rope_theta"]) is not None:
                w.add_rope_freq_base_swa(swa_theta)
            if getattr(config, "final_logit_softcapping", None):
                w.add_final_logit_softcapping(config.final_logit_softcapping)
            if getattr(config, "sliding_window", None):
                w.add_sliding_window(config.sliding_window)

    return _scratch_kv(rules.name, fill)


def _structural_overrides(kv: dict[str, Kv], config, rules: ArchRules) -> None:
    """A pruned model's dimensions differ from its source file's: the model's config wins."""
    mine = config_hparams(config, rules)
    for suffix in STRUCTURAL_KEYS:
        key = f"{rules.name}.{suffix}"
        if key in kv and key in mine and kv[key].value != mine[key].value:
            kv[key] = Kv(mine[key].value, kv[key].type)


# ---------------------------------------------------------------- vocabulary from a HF directory

# convert_hf_to_gguf.py identifies a BPE pre-tokenizer by hashing the token ids of this text
# (llama.cpp's `chktxt`, data needed to reproduce its hashes)
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# hash of the ids -> llama.cpp pre-tokenizer name; the llama-family subset of the converter's table
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def pre_tokenizer(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ShrinkError(f"The tokenizer's BPE pre-tokenizer is not one llama.cpp's converter knows (hash "
                          f"{digest[:12]}...); export from a GGUF file of this model, or convert it with llama.cpp.")
    return PRE_TOKENIZERS[digest]


def _looks_special(text: str) -> bool:
    # the converter marks these added tokens CONTROL even when the tokenizer does not call them special
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>")) or (text.startswith("<unused") and text.endswith(">")))


def _bpe_vocab(w: gguf.GGUFWriter, directory: Path, vocab_size: int) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    by_id = {i: text for text, i in tokenizer.get_vocab().items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        kind = gguf.TokenType.NORMAL
        if text is None:
            text, kind = f"[PAD{i}]", gguf.TokenType.UNUSED
        elif text in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                text = tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))
            if decoder[i].special or _looks_special(text):
                kind = gguf.TokenType.CONTROL
            else:
                text, kind = text.replace("\u2581", " "), gguf.TokenType.USER_DEFINED
        tokens.append(text)
        types.append(kind)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(directory, load_merges=True).add_to_gguf(w, quiet=True)


def _scored_vocab(w: gguf.GGUFWriter, directory: Path, vocab, vocab_size: int) -> None:
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    for i in range(len(tokens), vocab_size):  # the embedding may have more rows than the tokenizer has tokens
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    gguf.SpecialVocab(directory, n_vocab=len(tokens)).add_to_gguf(w, quiet=True)


def hf_vocab(directory: Path, config, rules: ArchRules) -> dict[str, Kv]:
    """tokenizer.* keys from a HF tokenizer directory, as llama.cpp's converter builds them for this architecture:
    sentencepiece (tokenizer.model) first, then a llama-style HF tokenizer.json, then GPT-2-style BPE."""
    directory = Path(directory)
    if not (directory / "tokenizer.json").is_file() and not (directory / "tokenizer.model").is_file():
        raise ShrinkError(f"{directory} has no tokenizer.json or tokenizer.model; give the model's tokenizer folder.")
    settings = {}
    if (directory / "tokenizer_config.json").is_file():
        settings = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))

    def fill(w: gguf.GGUFWriter) -> None:
        if rules.name == "llama" and settings.get("add_prefix_space") is not None:
            w.add_add_space_prefix(settings["add_prefix_space"])
        if (directory / "tokenizer.model").is_file():
            _scored_vocab(w, directory, gguf.SentencePieceVocab(directory), config.vocab_size)
            if rules.name == "gemma3":
                w.add_add_space_prefix(False)
        elif rules.name == "gemma3":
            raise ShrinkError(f"{directory} has no tokenizer.model, which a Gemma 3 GGUF vocabulary is built from; "
                              "copy it there from the original model, or export from the model's GGUF file.")
        else:
            try:
                _scored_vocab(w, directory, gguf.LlamaHfVocab(directory), config.vocab_size)
            except (FileNotFoundError, TypeError):  # not a llama/sentencepiece-style tokenizer.json: GPT-2 BPE
                _bpe_vocab(w, directory, config.vocab_size)
        if rules.name == "llama" and config.vocab_size == 49152:
            w.kv_data[0].pop(gguf.Keys.Tokenizer.ADD_BOS, None)  # replaced, not duplicated (gguf-py warns)
            w.add_add_bos_token(False)  # the converter's rule for this vocabulary size (granite-small, SmolLM)

    return _scratch_kv(rules.name, fill)


def provenance_kv(provenance: Mapping[str, object]) -> dict[str, Kv]:
    kv = {}
    for key, value in provenance.items():
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)):
            raise ShrinkError(f"The provenance key {key!r} cannot be a GGUF key; use letters, digits, '_', '.', '-'.")
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        kv[f"shrink.{key}"] = Kv(text, VType.STRING)
    return kv


# ---------------------------------------------------------------- the file


def write_gguf(path, model, *, source_gguf: Path | None, tokenizer_dir: Path | None,
               tensors: Mapping[str, GgufTensor], provenance: Mapping[str, object]) -> Path:
    """Write `model` with `tensors` (HF parameter name -> GgufTensor; the rest as F32) as a GGUF file llama.cpp
    loads; metadata from `source_gguf` (the file the model came from) or else `tokenizer_dir`. Atomic."""
    path = Path(path)
    if (source_gguf is None) == (tokenizer_dir is None):
        raise ShrinkError("Give exactly one of source_gguf (the GGUF file the model was loaded from) or "
                          "tokenizer_dir (its Hugging Face tokenizer folder).")
    config = model.config
    rules = arch_rules(config.model_type)
    state = model.state_dict()
    unknown = sorted(set(tensors) - set(state))
    if unknown:
        raise ShrinkError(f"The tensors {', '.join(unknown[:3])} are not parameters of the model; key them by its "
                          "state_dict() names.")
    names = gguf_names(rules, state, config.num_hidden_layers)
    unmapped = [n for n, g in names.items() if g is None]
    if unmapped:
        raise ShrinkError(f"llama.cpp has no tensor for {unmapped[0]} ({rules.name} architecture); this model "
                          "cannot be written as GGUF.")
    by_gguf = {g: h for h, g in names.items()}
    emb, out = by_gguf.get("token_embd.weight"), by_gguf.get("output.weight")
    skip_head = _tied(state, emb, out) and (out not in tensors or _same(tensors.get(out), tensors.get(emb)))

    arrays: list[tuple[str, np.ndarray, QType | None]] = []
    types: dict[str, tuple[str, int, int]] = {}
    for hf_name, param in state.items():
        if hf_name == out and skip_head:
            continue
        heads = _qk_heads(hf_name, rules, config.num_attention_heads, config.num_key_value_heads)
        shift = _shift(hf_name, rules)
        if hf_name in tensors:
            array, qtype = _given_array(hf_name, tensors[hf_name], tuple(param.shape), heads, shift)
            type_name = tensors[hf_name].type_name
        else:
            array, qtype, type_name = _param_array(param, heads, shift), None, "F32"
        arrays.append((names[hf_name], array, qtype))
        types[names[hf_name]] = (type_name, param.numel(), param.dim())

    if source_gguf is not None:
        reader = gguf.GGUFReader(source_gguf)
        source_arch = _field_str(reader, "general.architecture")
        if source_arch != rules.name:
            raise ShrinkError(f"The source GGUF {source_gguf} is a '{source_arch}' model but the model is "
                              f"'{rules.name}'; give the file the model was loaded from.")
        kv = source_kv(reader)
        _structural_overrides(kv, config, rules)
        written = {name for name, _, _ in arrays}
        for tensor in reader.tensors:
            if tensor.name in EXTRA_SOURCE_TENSORS and tensor.name not in written:
                arrays.append((tensor.name, np.array(tensor.data), QType(tensor.tensor_type)))
    else:
        kv = {"general.type": Kv("model", VType.STRING),
              "general.name": Kv(Path(getattr(config, "name_or_path", "") or "model").name or "model", VType.STRING),
              **config_hparams(config, rules), **hf_vocab(Path(tokenizer_dir), config, rules)}
    ftype = file_type(types)
    if ftype is not None:
        kv["general.file_type"] = Kv(ftype, VType.UINT32)
    kv["general.quantization_version"] = Kv(gguf.GGML_QUANT_VERSION, VType.UINT32)
    kv.update(provenance_kv(provenance))
    return _write(path, rules.name, kv, arrays)


def _write(path: Path, arch_name: str, kv: Mapping[str, Kv], arrays) -> Path:
    writer = gguf.GGUFWriter(None, arch_name)
    for key, item in kv.items():
        writer.add_key_value(key, item.value, item.type, sub_type=item.sub_type)
    for name, array, qtype in arrays:
        writer.add_tensor(name, array, raw_dtype=qtype)
    return write_atomically(writer, path)


def write_atomically(writer: gguf.GGUFWriter, path: Path) -> Path:
    """Write a filled GGUFWriter to `path` through a temporary file, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- reading back


def _field_str(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ShrinkError(f"The GGUF file has no {key}; it is not a model file.")
    return bytes(field.parts[field.data[0]]).decode()


def _field_int(reader, key: str) -> int:
    field = reader.fields.get(key)
    if field is None or len(field.data) != 1:
        raise ShrinkError(f"The GGUF file has no single value for {key}; it is not a file this writer understands.")
    return int(field.parts[field.data[0]][0])


def read_gguf_weights(path, arch: str | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file that is a model parameter, dequantized by gguf-py, under its HF name and in HF
    layout (q/k rows un-permuted, Gemma norms un-offset), float32. A tied head (no output.weight) is not listed."""
    reader = gguf.GGUFReader(path)
    file_arch = _field_str(reader, "general.architecture")
    rules = arch_rules(file_arch)
    if arch is not None and arch_rules(arch) is not rules:
        raise ShrinkError(f"{path} holds a '{file_arch}' model, not '{arch}'; read it with arch='{file_arch}'.")
    n_head = _field_int(reader, f"{file_arch}.attention.head_count")
    n_head_kv = _field_int(reader, f"{file_arch}.attention.head_count_kv")
    to_hf = hf_names_of(rules, _field_int(reader, f"{file_arch}.block_count"))
    weights = {}
    for tensor in reader.tensors:
        hf_name = to_hf.get(tensor.name)
        if hf_name is None:
            continue  # rope_freqs and other non-parameters
        values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32))
        heads = _qk_heads(hf_name, rules, n_head, n_head_kv)
        if heads is not None:
            values = values[torch.argsort(qk_row_order(values.shape[0], heads))]
        shift = _shift(hf_name, rules)
        weights[hf_name] = values - shift if shift else values
    return weights
