"""Compression plans: frozen, versioned, strictly loaded; an ordered list of rules where the first match wins.

A rule selects modules by kind, by block index and/or by a regex that must `re.fullmatch` the full module name, and says
what to do with them: quantize weights, prune, simulate activation / KV-cache quantization, or keep them as they are.
`resolve(model_or_inventory, plan)` turns a plan into the per-module table shown before anything runs.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace

import yaml

from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.formats import GGML_TYPES, SCALE_FORMATS
from shrink_core.model.inventory import ALL_KINDS, ModuleInfo

PLAN_VERSION = 1
PLANNABLE_KINDS = tuple(k for k in ALL_KINDS if k != "norm")
WEIGHT_BITS = (2, 3, 4, 5, 6, 8, 16, 32)  # 16 = float16 storage, 32 = unchanged float32
GROUP_SIZES = (32, 64, 128, None)  # None = per output channel ("channel" in YAML)
# One line per method: the Plan page's menu and the CLI's help show them.
METHOD_DESCRIPTIONS = {
    "rtn": "round to nearest: min/max scale and zero per group; no calibration, seconds.",
    "gptq": "GPTQ: each column's rounding error is fed forward through the inverse Hessian of the layer's "
            "calibration inputs, with an activation-weighted clip search for the group ranges.",
    "gptq-seq": "GPTQ fitted to the full-precision model: layer by layer within each block, on inputs that went "
                "through the layers already quantized, towards the full-precision layer's outputs (corrects error "
                "carried in from earlier layers; slower than gptq: docs/methods.md has the measured times).",
    "imatrix": "llama.cpp types only: llama.cpp's quantizer weighted by an importance matrix (mean squared "
               "activations from calibration).",
}
WEIGHT_METHODS = tuple(METHOD_DESCRIPTIONS)
GGML_METHODS = ("rtn", "imatrix")  # llama.cpp's quantizers: reference, or weighted by an importance matrix
HESSIAN_METHODS = ("gptq", "gptq-seq")  # read the full X^T X of each layer's calibration inputs
SEQUENTIAL_METHODS = ("gptq-seq",)  # also read X^T X_fp, layer by layer within a block
CALIBRATED_METHODS = (*HESSIAN_METHODS, "imatrix")
INT_METHODS = tuple(m for m in WEIGHT_METHODS if m not in GGML_METHODS or m == "rtn")  # the integer formats' menu
PRUNE_STRUCTURES = ("unstructured", "nm", "heads", "channels", "blocks")
MASK_CRITERIA = ("magnitude", "wanda", "sparsegpt")
STRUCTURED_CRITERIA = ("magnitude", "activation")
CALIBRATED_CRITERIA = ("wanda", "sparsegpt", "activation")
NM_PATTERNS = ((2, 4), (4, 8), (1, 4), (2, 8))
ACTIVATION_BITS = (8,)
KV_CACHE_BITS = (2, 3, 4, 8)
STRUCTURE_KINDS = {"heads": ("q", "k", "v", "o"), "channels": ("gate", "up", "down")}


class PlanError(ShrinkError):
    """A plan that cannot be loaded or does not fit the model."""


def _check_keys(data, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(data, dict):
        raise PlanError(f"{where} must be a mapping of keys to values, not {type(data).__name__}.")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise PlanError(f"Unknown key '{unknown[0]}' in {where}; allowed keys: {', '.join(allowed)}.")
    return data


def _keys(cls) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls))


@dataclass(frozen=True)
class WeightSpec:
    bits: int = 4
    group_size: int | None = 64
    symmetric: bool = False
    method: str = "rtn"
    # a llama.cpp type ("Q4_K"): the format is that type's blocks; bits becomes its nominal width, group_size None
    ggml: str | None = None
    # how group scales are stored (formats.SCALE_FORMATS): fp16, or log8 (8-bit log-grid scales, bits-bit zeros)
    scales: str = "fp16"
    where: str = field(default="weights", compare=False, repr=False)

    def __post_init__(self):
        if self.scales not in SCALE_FORMATS:
            raise PlanError(f"{self.where}: scales '{self.scales}' is unknown; use fp16 (float16 scales) or log8 "
                            "(8-bit log-grid scales).")
        if self.ggml is not None:
            if self.scales != "fp16":
                raise PlanError(f"{self.where}: a llama.cpp type stores its own scales; remove scales: "
                                f"{self.scales}.")
            name = str(self.ggml).upper()
            if name not in GGML_TYPES:
                raise PlanError(f"{self.where}: llama.cpp type '{self.ggml}' is not supported; use one of "
                                f"{', '.join(GGML_TYPES)}.")
            if self.method not in GGML_METHODS:
                raise PlanError(f"{self.where}: method '{self.method}' does not apply to llama.cpp type {name}; use "
                                "rtn (llama.cpp's reference quantizer) or imatrix (weighted by an importance matrix).")
            for key, value in (("ggml", name), ("bits", GGML_TYPES[name]), ("group_size", None), ("symmetric", False)):
                object.__setattr__(self, key, value)
            return
        if self.bits not in WEIGHT_BITS:
            raise PlanError(f"{self.where}: bits {self.bits} is not supported; use one of 2, 3, 4, 5, 6, 8, 16 or 32.")
        if self.group_size not in GROUP_SIZES:
            raise PlanError(
                f"{self.where}: group_size {self.group_size} is not supported; use 32, 64, 128 or 'channel'."
            )
        if self.method not in WEIGHT_METHODS:
            raise PlanError(f"{self.where}: method '{self.method}' is unknown; use one of {', '.join(WEIGHT_METHODS)}.")
        if self.method == "imatrix":
            raise PlanError(f"{self.where}: method imatrix applies to llama.cpp types only; add e.g. ggml: Q4_K, or "
                            "use rtn or gptq.")
        if not isinstance(self.symmetric, bool):
            raise PlanError(f"{self.where}: symmetric must be true or false, not {self.symmetric!r}.")
        if self.scales != "fp16" and self.bits >= 16:
            raise PlanError(f"{self.where}: fp{self.bits} weights have no group scales; remove scales: {self.scales}.")
        if self.scales != "fp16" and self.group_size is None:
            raise PlanError(f"{self.where}: scales {self.scales} pays off with groups (one scale a row is smaller as "
                            "float16); use group_size 32, 64 or 128, or scales: fp16.")

    @property
    def is_float(self) -> bool:
        return self.ggml is None and self.bits >= 16

    def label(self) -> str:
        if self.ggml is not None:
            return f"{self.ggml}{' imatrix' if self.method == 'imatrix' else ''} (llama.cpp)"
        if self.is_float:
            return f"fp{self.bits}"
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        scales = "" if self.scales == "fp16" else f" {self.scales}"
        return f"int{self.bits} {group}{scales} {'sym' if self.symmetric else 'asym'} {self.method}"


@dataclass(frozen=True)
class PruneSpec:
    structure: str = "unstructured"
    amount: float | None = None  # share removed: weights (unstructured), heads or channels
    n: int | None = None  # N:M: keep n of every m consecutive input weights
    m: int | None = None
    criterion: str = "magnitude"
    where: str = field(default="prune", compare=False, repr=False)

    def __post_init__(self):
        w = self.where
        if self.structure not in PRUNE_STRUCTURES:
            raise PlanError(f"{w}: structure '{self.structure}' is unknown; use one of {', '.join(PRUNE_STRUCTURES)}.")
        if self.structure == "nm":
            if (self.n, self.m) not in NM_PATTERNS:
                raise PlanError(f"{w}: N:M pattern {self.n}:{self.m} is not supported; use n: 2, m: 4 or n: 4, m: 8.")
        elif self.n is not None or self.m is not None:
            raise PlanError(f"{w}: n and m apply only to structure nm; remove them or set structure: nm.")
        if self.structure in ("unstructured", "heads", "channels"):
            if not isinstance(self.amount, (int, float)) or not 0 < self.amount < 1:
                raise PlanError(f"{w}: amount must be a share between 0 and 1 (e.g. 0.5), not {self.amount!r}.")
        elif self.amount is not None:
            raise PlanError(f"{w}: amount does not apply to structure {self.structure}; remove it.")
        allowed = MASK_CRITERIA if self.structure in ("unstructured", "nm") else STRUCTURED_CRITERIA
        if self.structure == "blocks":
            allowed = ("magnitude",)
        if self.criterion not in allowed:
            raise PlanError(
                f"{w}: criterion '{self.criterion}' does not apply to structure {self.structure}; "
                f"use one of {', '.join(allowed)}."
            )

    @property
    def is_mask(self) -> bool:
        return self.structure in ("unstructured", "nm")

    @property
    def calibrated(self) -> bool:
        return self.criterion in CALIBRATED_CRITERIA

    def pattern(self) -> str:
        """What is removed, without how it is chosen: "2:4", "unstructured 50%", "blocks removed"."""
        if self.structure == "nm":
            return f"{self.n}:{self.m}"
        if self.structure == "blocks":
            return "blocks removed"
        return f"{self.structure} {self.amount:.0%}"

    def label(self) -> str:
        return "remove block" if self.structure == "blocks" else f"{self.pattern()} {self.criterion}"


@dataclass(frozen=True)
class Rule:
    kind: tuple[str, ...] | None = None
    name: str | None = None  # regex, re.fullmatch on the full module name
    blocks: tuple[int, ...] | None = None  # block indices; negative counts from the end (-1 = last block)
    keep: bool = False
    weights: WeightSpec | None = None
    prune: PruneSpec | None = None
    activation_bits: int | None = None  # simulated int8 activations on the module's input
    kv_cache_bits: int | None = None  # simulated KV-cache quantization on k/v outputs
    note: str = ""
    index: int = field(default=1, compare=False)  # 1-based position in the plan, for messages

    def __post_init__(self):
        where = f"rule {self.index}"
        if self.kind is None and self.name is None and self.blocks is None:
            raise PlanError(f"{where.capitalize()} selects nothing; give it a kind, a name pattern or blocks.")
        for kind in self.kind or ():
            if kind not in PLANNABLE_KINDS:
                raise PlanError(f"Rule {self.index}: kind '{kind}' is unknown; use one of "
                                f"{', '.join(PLANNABLE_KINDS)}.")
        if self.name is not None:
            try:
                re.compile(self.name)
            except re.error as exc:
                raise PlanError(
                    f"Rule {self.index}: name pattern {self.name!r} is not a valid regex ({exc}).") from None
        acts = (self.weights, self.prune, self.activation_bits, self.kv_cache_bits)
        if self.keep and any(a is not None for a in acts):
            raise PlanError(f"Rule {self.index}: keep: true protects modules as they are, so it cannot also "
                            "quantize, prune or simulate; split it into two rules.")
        if not self.keep and all(a is None for a in acts):
            raise PlanError(f"Rule {self.index} does nothing; give it weights, prune, activation_bits, "
                            "kv_cache_bits or keep: true.")
        if self.activation_bits not in (None,) + ACTIVATION_BITS:
            raise PlanError(f"Rule {self.index}: activation_bits {self.activation_bits} is not supported; use 8.")
        if self.kv_cache_bits not in (None,) + KV_CACHE_BITS:
            raise PlanError(
                f"Rule {self.index}: kv_cache_bits {self.kv_cache_bits} is not supported; use 2, 3, 4 or 8.")
        if self.prune and self.prune.structure == "blocks" and self.weights is not None:
            raise PlanError(f"Rule {self.index}: a removed block cannot also be quantized; drop its weights.")
        family = STRUCTURE_KINDS.get(self.prune.structure) if self.prune else None
        if family and (self.kind is None or not set(self.kind) <= set(family)):
            raise PlanError(f"Rule {self.index}: {self.prune.structure} pruning needs kind limited to "
                            f"{', '.join(family)}; set kind: [{', '.join(family)}].")

    def selects(self, info: ModuleInfo, block_count: int) -> bool:
        if self.kind is not None and info.kind not in self.kind:
            return False
        if self.blocks is not None:
            wanted = {b % block_count for b in self.blocks} if block_count else set()
            if info.block is None or info.block not in wanted:
                return False
        return self.name is None or re.fullmatch(self.name, info.name) is not None

    def describe(self) -> str:
        parts = [f"kind={','.join(self.kind)}" if self.kind else "",
                 f"name={self.name!r}" if self.name is not None else "",
                 f"blocks={list(self.blocks)}" if self.blocks is not None else ""]
        return " ".join(p for p in parts if p)


ROTATE_KINDS = ("hadamard",)
TUNE_KINDS = ("scales",)  # compression/tune.py: what end-to-end tuning trains after quantization


@dataclass(frozen=True)
class RotateSpec:
    """Rotate the inputs of the block linears quantized to integers before quantizing them (compression/rotate.py):
    the codes are taken in the rotated basis, so a runtime must apply the rotation to each such layer's input."""

    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self):
        if self.kind not in ROTATE_KINDS:
            raise PlanError(f"rotate: kind '{self.kind}' is unknown; use {', '.join(ROTATE_KINDS)}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise PlanError(f"rotate: seed must be a whole number >= 0, not {self.seed!r}.")


@dataclass(frozen=True)
class TuneSpec:
    """After quantization, train the integer-quantized block linears' group scales end to end (compression/tune.py):
    KL(unquantized || quantized) next-token distributions on the calibration rows, `holdout` of them kept aside to
    check the result; the codes, zeros and bytes are unchanged. `lr` unset: each module's step by its bit-width
    (compression/tune.py's auto_lr, the rates measured to be kept at 3 and 4 bits)."""

    kind: str = "scales"
    steps: int = 100
    lr: float | None = None
    batch: int = 2
    holdout: int = 8

    def __post_init__(self):
        if self.kind not in TUNE_KINDS:
            raise PlanError(f"tune: kind '{self.kind}' is unknown; use {', '.join(TUNE_KINDS)}.")
        for key in ("steps", "batch", "holdout"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"tune: {key} must be a whole number >= 1, not {value!r}.")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0 < self.lr <= 0.1):
            raise PlanError(f"tune: lr must be a number above 0 and at most 0.1, not {self.lr!r}; leave it out for "
                            "the step by bit-width.")


@dataclass(frozen=True)
class Plan:
    rules: tuple[Rule, ...]
    version: int = PLAN_VERSION
    name: str = ""
    description: str = ""
    calibration: CalibrationRecipe | None = None
    rotate: RotateSpec | None = None
    tune: TuneSpec | None = None

    def __post_init__(self):
        if self.version != PLAN_VERSION:
            raise PlanError(f"Plan version {self.version} is not supported; this code reads version {PLAN_VERSION}.")
        if not self.rules:
            raise PlanError("The plan has no rules; add at least one rule.")

    @property
    def needs_calibration(self) -> bool:
        return self.tune is not None or any((r.weights and r.weights.method in CALIBRATED_METHODS)
                                            or (r.prune and r.prune.calibrated) for r in self.rules)


# ---------------------------------------------------------------- loading and dumping


def _as_tuple(value, where: str, item_type) -> tuple | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(i, item_type) and not isinstance(i, bool) for i in items):
        raise PlanError(f"{where} must be a {item_type.__name__} or a list of them, not {value!r}.")
    return tuple(items)


_RANGE = re.compile(r"\s*(\d+)\s*-\s*(\d+)\s*")


def _blocks(value, where: str) -> tuple[int, ...] | None:
    """Block indices as a person writes them: integers (negative counts from the end) and inclusive ranges such as
    "2-29", alone or in a list."""
    if value is None:
        return None
    out = []
    for item in value if isinstance(value, list) else [value]:
        match = _RANGE.fullmatch(item) if isinstance(item, str) else None
        if match and int(match[1]) <= int(match[2]):
            out.extend(range(int(match[1]), int(match[2]) + 1))
        elif isinstance(item, int) and not isinstance(item, bool):
            out.append(item)
        else:
            raise PlanError(f"{where} must be block indices or ranges such as 2-29 (first <= last), not {item!r}.")
    return tuple(out)


def compact_blocks(blocks) -> list:
    """Blocks for a person to read: runs of three or more as "a-b" ranges (the form `_blocks` reads back)."""
    if any(b < 0 for b in blocks):
        return list(blocks)
    out, ordered = [], sorted(set(blocks))
    start = 0
    for i in range(1, len(ordered) + 1):
        if i == len(ordered) or ordered[i] != ordered[i - 1] + 1:
            run = ordered[start:i]
            out.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 3 else run)
            start = i
    return out


def _rule_from_dict(data, index: int) -> Rule:
    where = f"rule {index}"
    data = dict(_check_keys(data, tuple(k for k in _keys(Rule) if k != "index"), where))
    weights = data.pop("weights", None)
    if weights is not None:
        weights = dict(_check_keys(weights, ("bits", "group_size", "symmetric", "method", "ggml", "scales"),
                                   f"{where} weights"))
        if "ggml" in weights and {"bits", "group_size", "symmetric"} & set(weights):
            raise PlanError(f"Rule {index} weights: ggml: {weights['ggml']} sets the format by itself; remove bits, "
                            "group_size and symmetric.")
        if weights.get("group_size") in ("channel", "per-channel"):
            weights["group_size"] = None
        weights = WeightSpec(**weights, where=f"Rule {index} weights")
    prune = data.pop("prune", None)
    if prune is not None:
        prune = PruneSpec(**_check_keys(prune, ("structure", "amount", "n", "m", "criterion"), f"{where} prune"),
                          where=f"Rule {index} prune")
    for key, kind, example in (("name", str, "name: 'model\\.layers\\.0\\..*'"), ("note", str, "note: why"),
                               ("keep", bool, "keep: true")):
        value = data.get(key)
        if value is not None and not isinstance(value, kind):
            raise PlanError(f"Rule {index}: {key} must be {'a string' if kind is str else 'true or false'}, "
                            f"not {value!r}; write e.g. {example}.")
    data["kind"] = _as_tuple(data.get("kind"), f"Rule {index} kind", str)
    data["blocks"] = _blocks(data.get("blocks"), f"Rule {index} blocks")
    return Rule(**data, weights=weights, prune=prune, index=index)


def plan_from_dict(data) -> Plan:
    data = dict(_check_keys(data, _keys(Plan), "the plan"))
    if "version" not in data:
        raise PlanError(f"The plan has no version; add `version: {PLAN_VERSION}` at the top.")
    rules = data.pop("rules", None)
    if not isinstance(rules, list):
        raise PlanError("The plan needs `rules:`, a list of rules (first match wins).")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise PlanError(f"The plan's {key} must be a string, not {data[key]!r}; put it in quotes.")
    calibration = data.pop("calibration", None)
    if calibration is not None:
        try:
            calibration = CalibrationRecipe.from_dict(calibration)
        except ShrinkError as exc:
            raise PlanError(f"The plan's {exc}") from None
    rotate = data.pop("rotate", None)
    if isinstance(rotate, str):
        rotate = {"kind": rotate}
    if rotate is not None:
        rotate = RotateSpec(**_check_keys(rotate, _keys(RotateSpec), "the plan's rotate"))
    tune = data.pop("tune", None)
    if isinstance(tune, str):
        tune = {"kind": tune}
    if tune is not None:
        tune = TuneSpec(**_check_keys(tune, _keys(TuneSpec), "the plan's tune"))
    return Plan(rules=tuple(_rule_from_dict(r, i + 1) for i, r in enumerate(rules)), calibration=calibration,
                rotate=rotate, tune=tune, **data)


def _clean(obj):
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items() if v is not None and k not in ("where", "index")
                and not (k in ("keep",) and v is False) and not (k == "note" and v == "")}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def plan_to_dict(plan: Plan) -> dict:
    data = _clean(asdict(plan))
    for rule, raw in zip(plan.rules, data["rules"]):
        if rule.weights is not None and rule.weights.ggml is not None:  # the type names the format
            raw["weights"] = {"ggml": rule.weights.ggml, "method": rule.weights.method}
        elif rule.weights is not None:  # in the order a person reads them, per-channel spelled out, fp16 scales implied
            group = "channel" if rule.weights.group_size is None else rule.weights.group_size
            raw["weights"] = {"bits": raw["weights"]["bits"], "group_size": group,
                              **{k: v for k, v in raw["weights"].items() if k not in ("bits", "group_size")
                                 and not (k == "scales" and v == "fp16")}}
    if plan.calibration is not None:
        data["calibration"] = plan.calibration.to_dict()  # the mix as a mapping, as a person writes it
    ordered = {"version": plan.version, "name": plan.name, "description": plan.description}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return {k: v for k, v in ordered.items() if v not in ("", None)}


def dump_plan(plan: Plan) -> str:
    """The plan as YAML for a person: a rule's kinds, blocks (as ranges) and settings one short line each."""
    data = plan_to_dict(plan)
    for rule in data["rules"]:
        if "blocks" in rule:
            rule["blocks"] = _FlowList(compact_blocks(rule["blocks"]))
        if "kind" in rule:
            rule["kind"] = _FlowList(rule["kind"])
        for key in ("weights", "prune"):
            if key in rule:
                rule[key] = _FlowDict(rule[key])
    if "calibration" in data:
        data["calibration"]["mix"] = _FlowDict(data["calibration"]["mix"])
    for key in ("rotate", "tune"):
        if key in data:
            data[key] = _FlowDict(data[key])
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=10_000)  # no folded lines


class _FlowList(list):
    """A list written inline: blocks: [0-1, 5]."""


class _FlowDict(dict):
    """A mapping written inline: weights: {bits: 4, group_size: 64}."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(_FlowList, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data,
                                                                                  flow_style=True))
_Dumper.add_representer(_FlowDict, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data.items(),
                                                                                 flow_style=True))


def dump_plan_json(plan: Plan) -> str:
    return json.dumps(plan_to_dict(plan), indent=1)


# ---------------------------------------------------------------- resolve


def with_index(plan: Plan) -> Plan:
    """The plan with rule indices renumbered (after editing rules in code)."""
    return replace(plan, rules=tuple(replace(r, index=i + 1) for i, r in enumerate(plan.rules)))
