"""The layer inventory: every compressible module with its name, block, kind, shape and size."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block)\.(\d+)(?:\.|$)")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")

# Leaf-name -> kind, across the families of docs/architectures.md. Kinds are the vocabulary of plan rules, heatmaps
# and the planner; a fused module has its own kind (qkv, gate_up) since one setting covers all of its parts.
LEAF_KINDS = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "out_proj": "o",
    "qkv_proj": "qkv", "query_key_value": "qkv", "c_attn": "qkv",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "fc1": "up", "fc2": "down", "c_fc": "up", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "embed_tokens": "embedding", "wte": "embedding", "embed_in": "embedding",
    "lm_head": "lm_head", "embed_out": "lm_head",
}
# Leaves whose kind depends on the parent: GPT-2's c_proj is the attention output or the MLP's down projection.
PARENT_LEAF_KINDS = {("attn", "c_proj"): "o", ("mlp", "c_proj"): "down", ("attention", "dense"): "o"}
LINEAR_KINDS = ("q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "linear")
ALL_KINDS = ("embedding",) + LINEAR_KINDS + ("lm_head", "norm")


@dataclass(frozen=True)
class ModuleInfo:
    name: str  # full module name, e.g. model.layers.3.self_attn.q_proj
    block: int | None
    kind: str
    shape: tuple[int, ...]  # weight shape (out, in) for linears, (vocab, hidden) for embeddings
    params: int  # parameters this module owns (0 when its weight is tied to an earlier module)
    bytes: int  # bytes those parameters take in the current dtype
    dtype: str
    tied_to: str | None = None  # the module whose weight this one shares
    expert: int | None = None  # the expert index inside a mixture-of-experts layer

    def row(self) -> dict:
        row = asdict(self)
        row["shape"] = "x".join(str(s) for s in self.shape)
        return row


def module_kind(name: str, module) -> str | None:
    """The kind of a compressible module, or None for containers and activations."""
    import torch.nn as nn

    from shrink_core.model.arch import KEPT_LEAVES

    parts = name.rsplit(".", 2)
    leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
    if leaf in KEPT_LEAVES:
        return None  # routers, position tables: kept on purpose (arch.py)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        default = "embedding" if isinstance(module, nn.Embedding) else "linear"
        return PARENT_LEAF_KINDS.get((parent, leaf)) or LEAF_KINDS.get(leaf, default)
    if type(module).__name__.endswith(("RMSNorm", "LayerNorm")) and getattr(module, "weight", None) is not None:
        return "norm"
    return None


def inventory(model) -> list[ModuleInfo]:
    """All compressible modules in model order; a tied weight is counted once, at its first owner."""
    seen: dict[int, str] = {}
    rows = []
    for name, module in model.named_modules():
        kind = module_kind(name, module)
        if kind is None:
            continue
        owned = list(module.parameters(recurse=False))
        tied_to = None
        params = 0
        nbytes = 0
        for param in owned:
            key = id(param)
            if key in seen:
                tied_to = seen[key]
                continue
            seen[key] = name
            params += param.numel()
            nbytes += param.numel() * param.element_size()
        match, expert = BLOCK_INDEX.search(name), EXPERT_INDEX.search(name)
        weight = module.weight
        rows.append(
            ModuleInfo(
                name=name,
                block=int(match.group(1)) if match else None,
                kind=kind,
                shape=tuple(weight.shape),
                params=params,
                bytes=nbytes,
                dtype=str(weight.dtype).replace("torch.", ""),
                tied_to=tied_to,
                expert=int(expert.group(1)) if expert else None,
            )
        )
    return rows


def block_linears(rows: list[ModuleInfo]) -> list[ModuleInfo]:
    return [r for r in rows if r.block is not None and r.kind in LINEAR_KINDS]


def summary(model, rows: list[ModuleInfo]) -> dict:
    """Architecture facts for the Model page and `inspect --json`."""
    config = model.config
    text_config = getattr(config, "text_config", None) or config
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    from shrink_core.model.arch import uncovered_modules, uncovered_sentence

    tied = [r.name for r in rows if r.tied_to]
    experts = {r.expert for r in rows if r.expert is not None}
    return {
        "architecture": (config.architectures or [type(model).__name__])[0],
        "model_type": config.model_type,
        "parameters": params,
        "blocks": getattr(text_config, "num_hidden_layers", None),
        "hidden_size": getattr(text_config, "hidden_size", None),
        "attention_heads": getattr(text_config, "num_attention_heads", None),
        "kv_heads": getattr(text_config, "num_key_value_heads", None),
        "head_dim": getattr(text_config, "head_dim", None),  # None: hidden_size // attention_heads
        "intermediate_size": getattr(text_config, "intermediate_size", None),
        "vocab_size": getattr(text_config, "vocab_size", None),
        "context_length": getattr(text_config, "max_position_embeddings", None),
        "tied_embeddings": bool(tied),
        "tied_modules": tied,
        "bytes_fp32": params * 4,
        "bytes_bf16": params * 2,
        "dtype": rows[0].dtype if rows else None,
        "block_linears": len(block_linears(rows)),
        "modules": len(rows),
        "experts": len(experts),
        "fused_kinds": sorted({r.kind for r in rows if r.kind in ("qkv", "gate_up")}),
        "uncovered": uncovered_sentence(uncovered_modules(model, {r.name for r in rows})),
    }


def modules_from_rows(rows: list[dict]) -> list[ModuleInfo]:
    """ModuleInfo back from stored `row()` dicts (the store keeps the inventory; pages need no model to plan)."""
    out = []
    for row in rows:
        shape = tuple(int(x) for x in str(row["shape"]).split("x") if x)
        block, expert = row.get("block"), row.get("expert")
        out.append(ModuleInfo(name=row["name"], block=None if block is None or block != block else int(block),
                              kind=row["kind"], shape=shape, params=int(row["params"]), bytes=int(row["bytes"]),
                              dtype=row["dtype"], tied_to=row.get("tied_to"),
                              expert=None if expert is None or expert != expert else int(expert)))
    return out
