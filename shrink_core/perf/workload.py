"""What one forward pass of a candidate has to move and compute: its modules with their storage format.

Built from a real model (shapes after structural pruning) plus the per-module bits of a plan, or from the plan engine's
resolved table when it is at hand. Pure description: nothing here times or runs the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from shrink_core.formats import WeightFormat, weight_bytes
from shrink_core.model.inventory import LINEAR_KINDS, inventory

SPARSE_MIN_SHARE = 0.1  # fewer exact zeros than this is not sparsity (a dequantized Q8_0 embedding has ~1-3%)


@dataclass(frozen=True)
class ModuleWeights:
    name: str
    kind: str
    shape: tuple[int, ...]
    params: int  # stored parameters (0 for a tied weight: counted at its owner)
    bits: int  # 32/16 = float, else integer codes
    group_size: int | None
    symmetric: bool
    packed_bytes: int  # bytes as stored in the packed format (0 for a tied weight)
    streamed: bool  # read in full by every forward step (linears, lm_head); embedding lookups read a few rows
    zero_share: float = 0.0  # share of exact zeros in the weight
    sparse_pattern: str | None = None  # "2:4" when every 4 consecutive inputs hold >= 2 zeros, "unstructured" else
    bias_bytes: int = 0  # a bias, kept in the float dtype (counted in packed_bytes)
    ggml: str | None = None  # a llama.cpp type's blocks (bits is then its nominal width)
    scales: str = "fp16"  # how group scales are stored (formats.SCALE_FORMATS)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def read_bytes(self) -> int:
        """Bytes one forward step reads from this module's stored format (a tied weight is read again)."""
        if not self.streamed:
            return 0
        return (weight_bytes(self.shape, self.bits, self.group_size, self.symmetric, self.ggml, self.scales)
                + self.bias_bytes)


@dataclass(frozen=True)
class Workload:
    """A candidate's shape and storage, the input of memory, roofline and cost math."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    modules: tuple[ModuleWeights, ...]
    weight_source: str  # "engine packed bytes" | "computed from bits per module"
    ops_per_layer: int = 30  # operator launches per block in an eager runtime (matmuls, norms, rotary, softmax, ...)

    @property
    def weight_bytes(self) -> int:
        return sum(m.packed_bytes for m in self.modules)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.modules)

    @property
    def streamed_params(self) -> int:
        return sum(m.numel for m in self.modules if m.streamed)

    def kv_bytes_per_token(self, kv_bits: int = 32) -> float:
        """Bytes of K and V that one token adds to the cache, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * kv_bits / 8

    def to_dict(self) -> dict:
        return {"name": self.name, "layers": self.layers, "hidden": self.hidden, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "vocab": self.vocab, "params": self.params,
                "weight_bytes": self.weight_bytes, "weight_source": self.weight_source,
                "streamed_params": self.streamed_params}


def zero_pattern(weight) -> tuple[float, str | None]:
    """(share of exact zeros, "2:4" | "unstructured" | None) of a 2-D weight."""
    zeros = weight == 0
    share = float(zeros.float().mean())
    if share < SPARSE_MIN_SHARE:
        return share, None
    if weight.shape[-1] % 4 == 0 and bool((zeros.reshape(-1, 4).sum(-1) >= 2).all()):
        return share, "2:4"
    return share, "unstructured"


def _bias_bytes(row) -> int:
    """Bytes of an inventory row's bias: the parameters beyond its weight, at the row's float width."""
    extra = row.params - math.prod(row.shape)
    return extra * (row.bytes // row.params) if row.params and extra > 0 else 0


def _text_config(model):
    config = model.config
    return getattr(config, "text_config", None) or config


def describe_model(model, bits: dict | None = None, name: str = "", packed: dict | None = None,
                   sparse: dict | None = None) -> Workload:
    """The workload of `model` as it is now (pruned shapes included).

    bits: module name -> WeightFormat for modules stored as integer codes (others stay in the model's float dtype).
    packed: module name -> packed bytes reported by the plan engine; when given it overrides the computed bytes.
    sparse: module name -> "2:4" | "unstructured" for masked modules. Float modules are also checked for zeros;
    quantized ones are not (a code equal to the zero point is an exact 0 without being pruned).
    """
    bits, sparse = bits or {}, sparse or {}
    text = _text_config(model)
    heads = text.num_attention_heads
    modules = []
    for row in inventory(model):
        spec = bits.get(row.name)
        float_bits = 8 * (row.bytes // row.params) if row.params else 32
        width = spec.bits if spec else float_bits
        group = spec.group_size if spec else None
        symmetric = spec.symmetric if spec else True
        ggml, scales = (spec.ggml, spec.scales) if spec else (None, "fp16")
        bias = _bias_bytes(row)
        stored = 0 if row.tied_to else weight_bytes(row.shape, width, group, symmetric, ggml, scales) + bias
        if packed and row.name in packed:
            stored = int(packed[row.name])
        weight = model.get_submodule(row.name).weight.detach()
        share, pattern = zero_pattern(weight) if weight.dim() == 2 and (spec is None or row.name in sparse) else (0.0, None)
        pattern = sparse.get(row.name, pattern) if share > 0 else None
        modules.append(ModuleWeights(
            name=row.name, kind=row.kind, shape=row.shape, params=row.params, bits=width, group_size=group,
            symmetric=symmetric, packed_bytes=stored, streamed=row.kind in LINEAR_KINDS + ("lm_head",),
            zero_share=share, sparse_pattern=pattern, bias_bytes=bias, ggml=ggml, scales=scales,
        ))
    source = "engine packed bytes" if packed else "computed from bits per module"
    return Workload(
        name=name or type(model).__name__, layers=text.num_hidden_layers, hidden=text.hidden_size, heads=heads,
        kv_heads=text.num_key_value_heads or heads, head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size, modules=tuple(modules), weight_source=source,
    )


def workload_from_rows(rows, summary: dict, bits: dict | None = None, name: str = "") -> Workload:
    """The workload from a stored inventory and `inventory.summary` (no model at hand, as on the Plan page).

    bits: module name -> WeightFormat, as in `describe_model`; no zero-pattern check (the weights are not here).
    """
    bits = bits or {}
    modules = []
    for row in rows:
        if row.kind == "norm":
            continue
        spec = bits.get(row.name)
        width = spec.bits if spec else (8 * (row.bytes // row.params) if row.params else 32)
        group, symmetric = (spec.group_size, spec.symmetric) if spec else (None, True)
        ggml, scales = (spec.ggml, spec.scales) if spec else (None, "fp16")
        bias = _bias_bytes(row)
        stored = 0 if row.tied_to else weight_bytes(row.shape, width, group, symmetric, ggml, scales) + bias
        modules.append(ModuleWeights(row.name, row.kind, row.shape, row.params, width, group, symmetric, stored,
                                     streamed=row.kind in LINEAR_KINDS + ("lm_head",), bias_bytes=bias, ggml=ggml,
                                     scales=scales))
    heads = summary["attention_heads"]
    return Workload(
        name=name or summary.get("architecture", "model"), layers=summary["blocks"], hidden=summary["hidden_size"],
        heads=heads, kv_heads=summary.get("kv_heads") or heads, head_dim=stored_head_dim(rows, summary),
        vocab=summary["vocab_size"], modules=tuple(modules), weight_source="computed from bits per module",
    )


def stored_head_dim(rows, summary: dict) -> int:
    """The attention head width of a stored model: the config's `head_dim` when the summary holds it, else a query
    projection's outputs per head (summaries stored before it was recorded), else hidden_size // heads.

    Not always hidden // heads: Gemma 3 270m has hidden 640, 4 heads of 256.
    """
    heads = summary["attention_heads"]
    if summary.get("head_dim"):
        return int(summary["head_dim"])
    query = next((r for r in rows if r.kind == "q" and r.block is not None), None)
    if query is not None and query.shape[0] % heads == 0:
        return query.shape[0] // heads
    return summary["hidden_size"] // heads


def uniform_bits(model, bits: int = 4, group_size: int | None = 64, symmetric: bool = False) -> dict:
    """WeightFormat for every block linear (embedding and lm_head kept), like the w4g64 preset."""
    return {r.name: WeightFormat(bits, group_size, symmetric) for r in inventory(model)
            if r.block is not None and r.kind in LINEAR_KINDS}
