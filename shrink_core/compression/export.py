"""Candidates on disk and exports for deployment tools.

- `save_candidate`: the compressed model (fp32 safetensors of the quantize-dequantized weights, config, tokenizer),
  `plan.yaml`, `provenance.json`, and when an ApplyReport is given, `packed/model.packed.safetensors`: the real packed
  artifact (bit-packed integer codes, float16 scales and uint8 zeros, or log8 levels and bit-packed zeros) whose size
  the byte accounting predicts.
- `llm_compressor_recipe`: an llm-compressor recipe (GPTQModifier / QuantizationModifier / SparseGPTModifier...).
- `llama_cpp_tensor_types`: lines `REGEX=TYPE` for llama-quantize `--tensor-type` / `--tensor-type-file`.
See docs/deploy-exports.md for what each export cannot express.
"""
from __future__ import annotations

import datetime as dt
import json
import re
import shutil
from pathlib import Path

import torch
import yaml

from shrink_core import __version__
from shrink_core.compression.ggml.types import GgmlState
from shrink_core.compression.primitives import log_levels, pack, quantize
from shrink_core.compression.prune import sync_config_
from shrink_core.errors import ShrinkError
from shrink_core.formats import LOG_STEPS_PER_OCTAVE
from shrink_core.model.arch import native_state_dict
from shrink_core.model.inventory import EXPERT_INDEX
from shrink_core.plan import Plan, dump_plan, plan_to_dict
from shrink_core.plan.spec import HESSIAN_METHODS

PACKED_FILE = "packed/model.packed.safetensors"


def packed_tensors(model, report) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors of the packed format and their layout metadata; a tied weight is written once."""
    tensors, layout, written = {}, {}, set()
    states = {report.current_names.get(n, n): s for n, s in report.quant_states.items()}
    float_bits = {report.current_names.get(m.name, m.name): m.bits for m in report.modules if m.bits in (16, 32)}
    float_dtype = {16: torch.float16, 32: torch.float32}  # as the plan asks, whatever the model's dtype
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in written:
                continue
            written.add(id(param))
            key = f"{name}.{param_name}" if name else param_name
            state = states.get(name) if param_name == "weight" else None
            if isinstance(state, GgmlState):  # llama.cpp's block bytes, exactly as a GGUF file holds them
                if state.data is None:
                    tensors[key] = param.data.half().contiguous()
                else:
                    tensors[f"{key}.blocks"] = state.data.contiguous()
                layout[key] = {"ggml": state.stored, "requested": state.requested, "shape": list(param.shape)}
            elif state is not None:
                # a rotated module holds Q R: its codes are Q's, in the basis its input is rotated into
                weight = param.data if state.rotation is None else state.rotation.apply(param.data.float())
                codes = quantize(weight, state.scale, state.zero, state.bits, state.group_size)  # (out, in)
                tensors[f"{key}.codes"] = pack(codes, state.bits)
                layout[key] = {"bits": state.bits, "group_size": state.group_size, "symmetric": state.symmetric,
                               "shape": list(param.shape), "scales": state.scales}
                if state.scales == "log8":  # scale = 2 ** ((top - offset) / steps): primitives.from_log_levels
                    top, offset = log_levels(state.scale)
                    tensors[f"{key}.scale_top"], tensors[f"{key}.scale_offsets"] = top.contiguous(), offset.contiguous()
                    layout[key]["log_steps_per_octave"] = LOG_STEPS_PER_OCTAVE
                    if not state.symmetric:
                        tensors[f"{key}.zeros"] = pack(state.zero.to(torch.uint8), state.bits)
                else:
                    tensors[f"{key}.scales"] = state.scale.half().contiguous()
                    if not state.symmetric:
                        tensors[f"{key}.zeros"] = state.zero.to(torch.uint8).contiguous()
                if state.rotation is not None:
                    layout[key]["input_rotation"] = state.rotation.describe()
            elif name in float_bits and param_name == "weight":
                tensors[key] = param.data.to(float_dtype[float_bits[name]]).contiguous()
            else:
                tensors[key] = param.data.contiguous()
    return tensors, layout


def write_packed_artifact(model, report, path: Path) -> int:
    """Write the packed artifact (safetensors) and return its size in bytes."""
    from safetensors.torch import save_file

    tensors, layout = packed_tensors(model, report)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "shrink-packed-v1", "layout": json.dumps(layout)})
    return path.stat().st_size


def save_candidate(model, tokenizer, plan: Plan, out_dir, provenance: dict, report=None) -> Path:
    """Write a reloadable candidate directory (see module docstring); returns its path."""
    out_dir = Path(out_dir)
    problems = sync_config_(model)
    if problems:
        raise ShrinkError(f"The pruned model cannot be saved: {problems[0]}")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if getattr(model, "hf_quantizer", None) is not None:  # a GGUF-loaded model refuses to save otherwise
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    # in the family's own layout (Conv1D, fused experts), so plain transformers loads it
    model.save_pretrained(tmp, safe_serialization=True, state_dict=native_state_dict(model))
    tokenizer.save_pretrained(tmp)
    (tmp / "plan.yaml").write_text(dump_plan(plan), encoding="utf-8")
    record = {
        "plan": plan_to_dict(plan),
        "code_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **provenance,
    }
    if report is not None:
        packed_size = write_packed_artifact(model, report, tmp / PACKED_FILE)
        record.update({
            "calibration": report.calibration if report.calibration is not None else provenance.get("calibration"),
            "bytes": {**report.totals, "packed_artifact_file_bytes": packed_size, "packed_artifact": PACKED_FILE},
            "timings_s": report.timings,
            "calibration_forward_dtype": report.forward_dtype,
            "notes": report.notes,
        })
    (tmp / "provenance.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


# ---------------------------------------------------------------- deployment exports

GGUF_NAMES = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv", "o": "attn_output",
              "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"}


def gguf_tensor_name(row) -> str | None:
    if row.kind == "embedding":
        return "token_embd.weight"
    if row.kind == "lm_head":
        return "output.weight"
    if EXPERT_INDEX.search(row.name):
        return None  # llama.cpp stores a layer's experts as one 3-D tensor: one type for all of them
    if row.block is not None and row.kind in GGUF_NAMES:
        return f"blk.{row.block}.{GGUF_NAMES[row.kind]}.weight"
    return None


def ggml_type(weights) -> str:
    """The plan's llama.cpp type, or the closest one: legacy 32-wide blocks for group 32, K-quants (256 super-blocks)
    otherwise."""
    if weights is not None and weights.ggml is not None:
        return weights.ggml.lower().replace("_k", "_K")  # ggml's spelling: q4_K, iq4_xs
    if weights is None or weights.bits == 32:
        return "f32"
    if weights.bits == 16:
        return "f16"
    if weights.group_size == 32 and weights.bits in (4, 5):
        return f"q{weights.bits}_{0 if weights.symmetric else 1}"
    return {8: "q8_0", 6: "q6_K", 5: "q5_K", 4: "q4_K", 3: "q3_K", 2: "q2_K"}[weights.bits]


def llama_cpp_tensor_types(resolved) -> str:
    """`REGEX=TYPE` lines (one per tensor, anchored) for llama-quantize --tensor-type / --tensor-type-file."""
    lines = ["# shrink plan -> llama-quantize overrides; one anchored regex per GGUF tensor",
             "# approximate: llama.cpp block formats differ from the plan's group size (see docs/deploy-exports.md)"]
    for row in resolved:
        name = gguf_tensor_name(row)
        if name is None or row.tied_to or row.removed:
            continue
        lines.append(f"^{re.escape(name)}$={ggml_type(row.weights)}")
    return "\n".join(lines) + "\n"


def _scheme_key(row):
    w = row.weights
    return None if w is None or w.is_float else (w.bits, w.group_size, w.symmetric, w.method)


def llm_compressor_recipe(resolved) -> str:
    """An llm-compressor recipe: one config group per weight scheme, explicit targets, everything else ignored."""
    linear_rows = [r for r in resolved if r.kind != "embedding" and not r.removed]
    schemes: dict[tuple, list[str]] = {}
    for row in linear_rows:
        key = _scheme_key(row)
        if key is not None:
            schemes.setdefault(key, []).append(row.name)
    ignore = [f"re:^{re.escape(r.name)}$" if r.kind != "lm_head" else "lm_head"
              for r in linear_rows if _scheme_key(r) is None]
    stages = {}
    for methods, modifier in ((HESSIAN_METHODS, "GPTQModifier"), (("rtn",), "QuantizationModifier")):
        groups = {}
        for key, names in schemes.items():
            bits, group, symmetric, key_method = key
            if key_method not in methods:
                continue
            weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
                       "strategy": "channel" if group is None else "group"}
            if group is not None:
                weights["group_size"] = group
            groups[f"group_{len(groups)}"] = {"targets": [f"re:^{re.escape(n)}$" for n in names], "weights": weights}
        if groups:
            stages[modifier] = {"ignore": ignore, "config_groups": groups}
    sparsity = {}
    for row in linear_rows:
        if row.prune and row.prune.is_mask:
            modifier = {"sparsegpt": "SparseGPTModifier", "wanda": "WandaPruningModifier"}.get(
                row.prune.criterion, "MagnitudePruningModifier")
            structure = f"{row.prune.n}:{row.prune.m}" if row.prune.structure == "nm" else "0:0"
            amount = 1 - row.prune.n / row.prune.m if row.prune.structure == "nm" else row.prune.amount
            entry = sparsity.setdefault((modifier, structure, round(amount, 4)), [])
            entry.append(f"re:^{re.escape(row.name)}$")
    recipe = {}
    if sparsity:
        recipe["sparsity_stage"] = {"sparsity_modifiers": {
            modifier: {"sparsity": amount, "mask_structure": structure, "targets": targets}
            for (modifier, structure, amount), targets in sparsity.items()}}
    if stages:
        recipe["quant_stage"] = {"quant_modifiers": stages}
    header = "# shrink plan -> llm-compressor recipe (see docs/deploy-exports.md for what it cannot express)\n"
    return header + yaml.safe_dump(recipe, sort_keys=False)


def write_exports(resolved, out_dir, rotate=None, tune=None) -> dict[str, Path]:
    """Both recipes; with the plan's `rotate`, `tune` or log8 scales, each opens by saying it does not reproduce them
    (neither tool has them), so what they build is not the evaluated candidate."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"llm_compressor": out_dir / "llm-compressor-recipe.yaml",
             "llama_cpp": out_dir / "llama-cpp-tensor-types.txt"}
    warning = "" if rotate is None else (
        f"# NOT the evaluated candidate: the plan rotates the quantized linears' inputs ({rotate.kind}, seed "
        f"{rotate.seed}) and this recipe cannot; its model is the same formats without the rotation\n")
    if tune is not None:
        warning += ("# NOT the evaluated candidate: the plan tunes the group scales end to end after quantizing and "
                    "this recipe cannot; its model is the same formats with untuned scales\n")
    if any(r.weights is not None and r.weights.scales != "fp16" for r in resolved):
        warning += ("# NOT the evaluated candidate: the plan stores group scales on an 8-bit log grid (log8) and "
                    "these tools store their own scales; its model is the same bits and groups with their scales\n")
    paths["llm_compressor"].write_text(warning + llm_compressor_recipe(resolved), encoding="utf-8")
    paths["llama_cpp"].write_text(warning + llama_cpp_tensor_types(resolved), encoding="utf-8")
    return paths
