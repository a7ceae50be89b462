"""Plan resolution: the per-module table (matched rule, settings, new shape, packed and sparse bytes)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from shrink_core.formats import ggml_row_type, ggml_weight_bytes, kept_channels, kept_heads_per_group, packed_weight_bytes
from shrink_core.model.inventory import ModuleInfo, inventory
from shrink_core.plan.spec import Plan, PlanError, PruneSpec, Rule, WeightSpec

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
FALLBACK = "fallback: no calibration statistics"  # how a calibrated method run without its statistics is labelled
METADATA_BYTES_PER_TENSOR = 96  # safetensors header entry (name, dtype, shape, offsets), an estimate


@dataclass(frozen=True)
class ResolvedModule:
    name: str
    block: int | None
    kind: str
    shape: tuple[int, ...]
    rule: int | None  # 1-based index of the rule that decides this module; None = no rule (kept)
    keep: bool  # protected or untouched
    weights: WeightSpec | None
    prune: PruneSpec | None
    activation_bits: int | None
    kv_cache_bits: int | None
    tied_to: str | None
    new_shape: tuple[int, ...]  # after structured pruning; (0, 0) when the block is removed
    dense_bytes: int  # bytes now, at the model's dtype (0 for a tied weight: counted at its owner)
    packed_bytes: int  # bytes in the packed format: codes + scales + zeros (+ bias), dense layout
    sparse_bytes: int | None  # as a sparse format would store a masked module (labelled by sparse_format)
    sparse_format: str | None
    note: str = ""

    @property
    def bits(self) -> int | None:
        return self.weights.bits if self.weights else None

    @property
    def group_size(self) -> int | None:
        return self.weights.group_size if self.weights and not self.weights.is_float else None

    @property
    def method(self) -> str | None:
        return self.weights.method if self.weights and not self.weights.is_float else None

    @property
    def stored_bytes(self) -> int:
        """The bytes the model's size counts: a masked module at its sparse format's, else packed (as `eval`)."""
        return self.packed_bytes if self.sparse_bytes is None else self.sparse_bytes

    @property
    def removed(self) -> bool:
        return bool(self.prune and self.prune.structure == "blocks")

    def row(self) -> dict:
        group = None
        if self.weights and not self.weights.is_float:
            group = "channel" if self.weights.group_size is None else self.weights.group_size
        return {
            "module": self.name, "block": self.block, "kind": self.kind, "shape": "x".join(map(str, self.shape)),
            "rule": self.rule, "bits": self.bits, "group": group, "symmetric": self.weights.symmetric if self.weights
            and not self.weights.is_float else None, "method": self.method,
            "ggml": self.weights.ggml if self.weights else None,
            "scales": self.weights.scales if self.weights and not self.weights.is_float else None,
            "prune": self.prune.label() if self.prune else None, "keep": self.keep,
            "activation_bits": self.activation_bits, "kv_cache_bits": self.kv_cache_bits,
            "new_shape": "x".join(map(str, self.new_shape)), "dense_bytes": self.dense_bytes,
            "packed_bytes": self.packed_bytes, "sparse_bytes": self.sparse_bytes, "sparse_format": self.sparse_format,
            "tied_to": self.tied_to, "note": self.note,
        }


def first_match(rules: tuple[Rule, ...], info: ModuleInfo, block_count: int) -> Rule | None:
    return next((r for r in rules if r.selects(info, block_count)), None)


def weight_bytes(shape: tuple[int, ...], weights: WeightSpec | None, dtype_bytes: int) -> int:
    numel = math.prod(shape)
    if weights is not None and weights.ggml is not None:
        return ggml_weight_bytes(shape, weights.ggml)
    if weights is None or weights.bits == 32:
        return numel * dtype_bytes if weights is None else numel * 4
    if weights.bits == 16:
        return numel * 2
    return packed_weight_bytes((shape[0], shape[1]), weights.bits, weights.group_size, weights.symmetric,
                               weights.scales)["total"]


def sparse_bytes(shape: tuple[int, ...], weights: WeightSpec | None, prune: PruneSpec, dtype_bytes: int):
    """Bytes of a masked module stored sparsely: kept values + index metadata + scales/zeros."""
    numel = math.prod(shape)
    if weights is not None and weights.ggml is not None:  # llama.cpp has no sparse storage
        return ggml_weight_bytes(shape, weights.ggml), f"dense {weights.ggml} blocks (llama.cpp stores no sparsity)"
    if prune.structure == "nm":
        kept = numel * prune.n // prune.m
        metadata, label = math.ceil(kept * math.log2(prune.m) / 8), f"{prune.n}:{prune.m} values + index metadata"
    else:
        kept = round(numel * (1 - prune.amount))
        metadata, label = math.ceil(numel / 8), "bitmap (1 bit per weight) + kept values"
    if weights is None or weights.is_float:
        value_bytes = kept * (dtype_bytes if weights is None else weights.bits // 8)
        return value_bytes + metadata, label
    dense = packed_weight_bytes((shape[0], shape[1]), weights.bits, weights.group_size, weights.symmetric,
                                weights.scales)
    return math.ceil(kept * weights.bits / 8) + dense["scales"] + dense["zeros"] + metadata, label


def _attention_shape(config) -> tuple[int, int, int]:
    text = getattr(config, "text_config", None) or config
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads or text.num_attention_heads
    return heads, kv_heads, getattr(text, "head_dim", None) or text.hidden_size // heads


def _new_shape(info: ModuleInfo, prune: PruneSpec | None, config) -> tuple[int, ...]:
    if prune is None or prune.is_mask:
        return info.shape
    if prune.structure == "blocks":
        return (0, 0)
    out_dim, in_dim = info.shape
    if prune.structure == "channels":
        if info.kind == "down":
            return (out_dim, kept_channels(in_dim, prune.amount))
        return (kept_channels(out_dim, prune.amount), in_dim)
    if config is None:
        raise PlanError("Resolving a head-pruning plan needs the model (for its head count); pass the model, "
                        "not its inventory.")
    heads, kv_heads, head_dim = _attention_shape(config)
    kept = kept_heads_per_group(heads // kv_heads, prune.amount) * kv_heads * head_dim
    if info.kind == "q":
        return (kept, in_dim)
    if info.kind == "o":
        return (out_dim, kept)
    return info.shape  # k and v keep every KV head


def _check_structures(table: dict[str, tuple[Rule | None, ModuleInfo]]) -> None:
    by_block: dict[int, list[tuple[Rule | None, ModuleInfo]]] = {}
    for rule, info in table.values():
        if info.block is not None:
            by_block.setdefault(info.block, []).append((rule, info))
    for block, members in by_block.items():
        for structure, kinds in (("channels", ("gate", "up", "down")), ("heads", ("q", "o")), ("blocks", None)):
            chosen = [(r, i) for r, i in members if r and r.prune and r.prune.structure == structure]
            if not chosen:
                continue
            family = [(r, i) for r, i in members if kinds is None or i.kind in kinds]
            odd = [(r, i) for r, i in family if not (r and r.prune == chosen[0][0].prune)]
            if odd:
                what = {"channels": "MLP channels come out of gate, up and down together",
                        "heads": "heads come out of q and o together",
                        "blocks": "a removed block takes all its modules"}[structure]
                other = f"rule {odd[0][0].index}" if odd[0][0] else "no rule"
                raise PlanError(f"Rule {chosen[0][0].index} prunes {structure} in block {block} but {odd[0][1].name} "
                                f"matches {other}; {what}, so select them all with the same rule.")


def resolve_rows(rows: list[ModuleInfo], plan: Plan, config=None) -> list[ResolvedModule]:
    plannable = [r for r in rows if r.kind != "norm"]
    block_count = max((r.block for r in plannable if r.block is not None), default=-1) + 1
    table = {info.name: (first_match(plan.rules, info, block_count), info) for info in plannable}
    for rule in plan.rules:
        if not any(rule.selects(info, block_count) for info in plannable):
            raise PlanError(f"Rule {rule.index} ({rule.describe()}) matches no module of this model; "
                            "fix its kind, name or blocks, or delete it.")
    used = {r.index for r, _ in table.values() if r is not None}
    for rule in plan.rules:
        if rule.index not in used:
            raise PlanError(f"Rule {rule.index} ({rule.describe()}) matches only modules that earlier rules already "
                            "decide (first match wins), so it changes nothing; move it up or delete it.")
    _check_structures(table)
    notes = _tie_rules_(table)
    return [_resolve_one(info, table[info.name][0], notes.get(info.name, ""), config) for info in plannable]


def _tie_rules_(table: dict) -> dict[str, str]:
    """A shared (tied) weight follows the earlier of the rules matching its owner and its follower; both rows say so."""
    notes = {}
    for name, (rule, info) in list(table.items()):
        if not info.tied_to or info.tied_to not in table:
            continue
        owner_rule = table[info.tied_to][0]
        candidates = [r for r in (owner_rule, rule) if r is not None]
        decider = min(candidates, key=lambda r: r.index) if candidates else None
        notes[name] = f"tied to {info.tied_to}: one shared weight, counted there"
        if decider is not None:
            notes[name] += f" (follows rule {decider.index})"
            if decider is not owner_rule:
                notes[info.tied_to] = (f"shares its weight with {name}; follows rule {decider.index}, "
                                       f"which matches {name}")
        table[name] = (decider, info)
        table[info.tied_to] = (decider, table[info.tied_to][1])
    return notes


def _resolve_one(info: ModuleInfo, rule: Rule | None, note: str, config) -> ResolvedModule:
    dtype_bytes = DTYPE_BYTES.get(info.dtype, 4)
    weights = rule.weights if rule and not rule.keep else None
    prune = rule.prune if rule and not rule.keep else None
    if prune and prune.structure == "heads" and info.kind in ("k", "v"):
        prune, note = None, "KV heads are kept; query heads are pruned evenly within each KV group"
    if weights and not weights.is_float and info.kind in ("embedding", "lm_head") and weights.method != "rtn":
        note = (note + "; " if note else "") + (f"{weights.method} applies to block linears; this uses rtn "
                                                f"({FALLBACK})")
    if prune and prune.criterion in ("wanda", "sparsegpt") and info.block is None and not info.tied_to:
        note = (note + "; " if note else "") + (f"{prune.criterion} needs calibration statistics, collected for block "
                                                f"linears only; this prunes by magnitude ({FALLBACK})")
    new_shape = _new_shape(info, prune, config)
    stored = ggml_row_type(weights.ggml, new_shape[1]) if weights and weights.ggml else None
    if stored is not None and stored != weights.ggml:
        note = (note + "; " if note else "") + (f"{weights.ggml} needs rows that are a multiple of its block; "
                                                f"{new_shape[1]}-wide rows are stored as {stored}, as llama.cpp does")
    if weights and not weights.is_float and weights.group_size and new_shape[1] % weights.group_size:
        full, rest = divmod(new_shape[1], weights.group_size)
        note = (note + "; " if note else "") + (f"partial last group: {new_shape[1]} inputs = {full} x "
                                                f"{weights.group_size} + {rest}")
    tied = info.tied_to is not None
    removed = bool(prune and prune.structure == "blocks")
    # a bias (one value per output, at the model's dtype) follows the outputs structured pruning keeps
    bias = new_shape[0] * dtype_bytes if info.params > math.prod(info.shape) else 0
    packed = 0 if tied or removed else weight_bytes(new_shape, weights, dtype_bytes) + bias
    sparse, sparse_format = (None, None)
    if prune and prune.is_mask and not tied:
        sparse, sparse_format = sparse_bytes(new_shape, weights, prune, dtype_bytes)
        sparse += bias
    return ResolvedModule(
        name=info.name, block=info.block, kind=info.kind, shape=info.shape, rule=rule.index if rule else None,
        keep=rule is None or rule.keep or (weights is None and prune is None), weights=weights, prune=prune,
        activation_bits=rule.activation_bits if rule else None,
        kv_cache_bits=rule.kv_cache_bits if rule and info.kind in ("k", "v") else None,
        tied_to=info.tied_to, new_shape=new_shape, dense_bytes=0 if tied else info.bytes, packed_bytes=packed,
        sparse_bytes=sparse, sparse_format=sparse_format, note=note,
    )


def totals(resolved: list[ResolvedModule], rows: list[ModuleInfo] | None = None) -> dict:
    """Byte totals of the planned modules; with the inventory `rows`, also what no rule covers (norms, stored as
    they are; a tied module counts once, at its owner) and the whole model's totals, as `apply` reports them."""
    dense = sum(r.dense_bytes for r in resolved)
    packed = sum(r.packed_bytes for r in resolved)
    sparse = sum(r.stored_bytes for r in resolved)
    out = {"dense_bytes": dense, "packed_bytes": packed, "packed_sparse_bytes": sparse}
    if rows is not None:
        covered = {r.name for r in resolved}
        other = sum(r.bytes for r in rows if r.name not in covered and not r.tied_to)
        out.update(other_bytes=other, total_packed_bytes=packed + other, total_packed_sparse_bytes=sparse + other)
    return out


def resolve(model_or_inventory, plan: Plan):
    """The per-module table: which rule each module matches and what it becomes ."""
    rows = model_or_inventory if isinstance(model_or_inventory, list) else inventory(model_or_inventory)
    config = None if isinstance(model_or_inventory, list) else model_or_inventory.config
    return resolve_rows(rows, plan, config)
