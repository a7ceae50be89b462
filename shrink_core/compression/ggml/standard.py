"""The mixes people ship (Q4_K_M, Q5_K_M, Q8_0, IQ4_XS, ...) as plans: llama-quantize's type per tensor, for this model.

So a user's own plan is compared, on the same slices and the same engine, with what they would otherwise download.
With `imatrix`, the plan quantizes with an importance matrix from its calibration mix, as `llama-quantize --imatrix`
does with one from `llama-imatrix`.
"""
from __future__ import annotations

from shrink_core.compression.export import gguf_tensor_name
from shrink_core.compression.ggml.mixes import FTYPES, llama_quantize_types
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe
from shrink_core.plan import Plan, plan_from_dict

STANDARD_MIXES = ("Q4_K_M", "Q5_K_M", "Q8_0", "IQ4_XS")  # what the Results page offers in one click
FLOAT_TYPES = {"F32": 32, "F16": 16, "BF16": 16}


def mix_name(ftype: str, imatrix: bool) -> str:
    return f"llama.cpp {ftype}{' imatrix' if imatrix else ''}"


def standard_types(rows, summary: dict, ftype: str, imatrix: bool = False) -> dict[str, str]:
    """module name -> the type llama-quantize gives its tensor for `ftype` (tied modules left out: stored once)."""
    if ftype not in FTYPES:
        raise ShrinkError(f"Unknown llama.cpp mix '{ftype}'; use one of {', '.join(FTYPES)}.")
    named = {}
    for row in rows:
        name = gguf_tensor_name(row)
        if name is not None and not row.tied_to and len(row.shape) == 2:
            named[name] = row
    if not named:
        raise ShrinkError("No tensor of this model maps to a llama.cpp tensor name; llama.cpp mixes need a "
                          "Llama-style decoder (blocks of attention and MLP linears).")
    tensors = [(name, (row.shape[0], row.shape[1])) for name, row in named.items()]
    types = llama_quantize_types(
        tensors, ftype, arch=str(summary.get("model_type") or "llama"), n_layer=int(summary["blocks"]),
        n_head=int(summary["attention_heads"]), n_head_kv=int(summary.get("kv_heads") or summary["attention_heads"]),
        n_expert=int(summary.get("experts") or 0), has_output=any(r.kind == "lm_head" and not r.tied_to for r in rows),
        imatrix=imatrix)
    return {row.name: types[name] for name, row in named.items() if name in types}


def standard_plan(rows, summary: dict, ftype: str, imatrix: bool = False) -> Plan:
    """The mix as a plan: one rule per (type, kind) over the blocks that take it."""
    types = standard_types(rows, summary, ftype, imatrix)
    by_name = {row.name: row for row in rows}
    groups: dict[tuple[str, str], list] = {}
    for name, type_name in types.items():
        row = by_name[name]
        groups.setdefault((type_name, row.kind), []).append(row.block)
    rules = []
    for (type_name, kind), blocks in sorted(groups.items(), key=lambda g: (g[0][1], g[0][0])):
        if type_name in FLOAT_TYPES:
            action = {"keep": True} if FLOAT_TYPES[type_name] == 32 else {"weights": {"bits": 16}}
        else:
            action = {"weights": {"ggml": type_name, "method": "imatrix" if imatrix else "rtn"}}
        rule = {"kind": [kind], **action, "note": f"llama-quantize {ftype}"}
        in_blocks = sorted(b for b in blocks if b is not None)
        if in_blocks:
            rule["blocks"] = in_blocks
        rules.append(rule)
    data = {"version": 1, "name": mix_name(ftype, imatrix), "rules": rules,
            "description": f"llama-quantize's {ftype} type per tensor for this model"
                           f"{', with an importance matrix from the calibration mix' if imatrix else ''}"}
    if imatrix:
        data["calibration"] = CalibrationRecipe().to_dict()
    return plan_from_dict(data)
