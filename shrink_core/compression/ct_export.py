"""Export a compressed model as a compressed-tensors `pack-quantized` directory (W4A16 / W8A16).

The directory is what llm-compressor writes for such a model, so vLLM and transformers (with the `compressed-tensors`
package) read it: config.json carries a `quantization_config` with one config group per weight scheme (bits, group
size, symmetry) that lists its modules by exact name, and `ignore` names every other Linear, so nothing is
quantized by a pattern that was not meant. (transformers 5.24 with compressed-tensors 0.20 loads symmetric schemes
as they are; asymmetric ones only through `dequantize=True` and then only when the plan has one scheme, or after
compressed-tensors' own `convert_checkpoint` dequantizer: both are their bugs, see tests/test_ct_export.py.)

The numbers map exactly. Our codes are unsigned, c in [0, 2**bits - 1], value (c - zero) * scale. compressed-tensors
works with signed values q = c - 2**(bits - 1) and a signed zero point zp = zero - 2**(bits - 1) (0 when symmetric,
since our symmetric zero is 2**(bits - 1)); its value (q - zp) * scale is the same number. Its packed storage adds
2**(bits - 1) back before packing, so the packed words hold our unsigned codes and zeros unchanged: 32 / bits values
per int32, value j of a word in bits [j * bits, (j + 1) * bits); weights packed along the input dimension, zero points
(asymmetric only) along the output dimension. Scales hold float16 values, as our format rounds them (see
`_scale_dtype` for the dtype they are stored in).

What it cannot express raises ShrinkError naming the module: bits other than 4 and 8, a group size that does not
divide the input width (compressed-tensors has no partial last group), quantized embeddings, tied, transposed
(Conv1D) or fused-expert weights, llama.cpp types, and simulated activation / KV-cache quantization. Pruning masks
are fine: pruned weights stay in the dense layout as zeros (code == zero).
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from shrink_core import __version__
from shrink_core.compression.apply import QuantState
from shrink_core.compression.primitives import dequantize, quantize
from shrink_core.compression.prune import sync_config_
from shrink_core.compression.simulate import HOOKS_ATTRIBUTE
from shrink_core.errors import ShrinkError
from shrink_core.model.arch import native_state_dict

CT_FORMAT = "pack-quantized"
CT_BITS = (4, 8)  # vLLM's W4A16 / W8A16 kernels (compressed-tensors itself packs 1..8)
WEIGHTS_FILE = "model.safetensors"
# modules vLLM fuses into one layer (qkv_proj, gate_up_proj): they must share one scheme, or all be ignored
FUSED_KINDS = (("q", "k", "v"), ("gate", "up"))


@dataclass(frozen=True)
class CtScheme:
    """One compressed-tensors weight scheme: integer weights, static, float16 activations untouched."""

    bits: int
    group_size: int | None  # None = one scale per output channel
    symmetric: bool

    def label(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        return f"W{self.bits}A16 {group} {'sym' if self.symmetric else 'asym'}"

    def weights_args(self) -> dict:
        """QuantizationArgs as compressed-tensors serializes them."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if self.group_size is None else "group", "group_size": self.group_size,
                "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax",
                "observer_kwargs": {}}


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned values (rows, cols) < 2**bits -> int32 (rows, ceil(cols * bits / 32)), packed along each row;
    the last word is zero-padded. Only for bits dividing 32, so no value straddles two words."""
    per_word = 32 // bits
    values = values.cpu()  # packed words go to a file
    rows, cols = values.shape
    words = -(-cols // per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    out = torch.empty(rows, words, dtype=torch.int32)
    step = max(1, 2**22 // max(cols, 1))  # int64 working copies of a few million values at a time, not a whole matrix
    for start in range(0, rows, step):
        part = torch.nn.functional.pad(values[start:start + step].to(torch.int64), (0, words * per_word - cols))
        packed = (part.reshape(part.shape[0], words, per_word) << shifts).sum(dim=-1)  # in [0, 2**32)
        out[start:start + step] = torch.where(packed >= 2**31, packed - 2**32, packed)  # the same bits, as int32
    return out


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 (rows, words) -> int64 values (rows, cols)."""
    per_word = 32 // bits
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    values = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & (2**bits - 1)  # arithmetic shift, then masked
    return values.reshape(packed.shape[0], -1)[:, :cols]


def quantization_config(targets: dict[CtScheme, list[str]], ignore: list[str]) -> dict:
    """config.json's `quantization_config`: one group per scheme with its modules' exact names."""
    groups = {}
    for index, (scheme, names) in enumerate(targets.items()):
        groups[f"group_{index}"] = {"targets": list(names), "weights": scheme.weights_args(),
                                    "input_activations": None, "output_activations": None, "format": CT_FORMAT}
    return {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": list(ignore), "kv_cache_scheme": None,
            "global_compression_ratio": None}


def _scheme_for(name: str, module, state, shared: bool) -> CtScheme:
    """The module's scheme, or ShrinkError saying why compressed-tensors cannot hold it."""
    if not isinstance(state, QuantState):  # a llama.cpp type: its own block layout, not an integer grid
        raise ShrinkError(f"{name} is stored as a llama.cpp type, which compressed-tensors cannot express; use an "
                          "int4 or int8 rtn/gptq weight spec for it.")
    if state.rotation is not None:
        raise ShrinkError(f"{name} was quantized with its input rotated (the plan's rotate), and this export does not "
                          "write the rotation a runtime would need; remove rotate from the plan to export to "
                          "compressed-tensors.")
    if state.scales != "fp16":
        raise ShrinkError(f"{name} stores its group scales as {state.scales}, and compressed-tensors stores a float "
                          "scale per group (re-rounding would not be the evaluated candidate); use scales: fp16 for "
                          "it to export.")
    if not isinstance(module, torch.nn.Linear):
        kind = "an embedding" if isinstance(module, torch.nn.Embedding) else f"a {type(module).__name__}"
        raise ShrinkError(f"{name} is {kind}, and the compressed-tensors export quantizes Linear layers only; keep "
                          "it in float in the plan (keep: true or bits 16) to export.")
    if shared:
        raise ShrinkError(f"{name} shares its weight with another module (tied embeddings), which a packed "
                          "compressed-tensors weight cannot; keep it in float in the plan to export.")
    if state.bits not in CT_BITS:
        raise ShrinkError(f"{name} is quantized to {state.bits} bits, and the compressed-tensors export writes "
                          "4 or 8 bits (vLLM's W4A16 / W8A16); use bits 4 or 8 for it.")
    columns = module.weight.shape[1]
    if state.group_size is not None and columns % state.group_size:
        raise ShrinkError(f"{name} has {columns} inputs, not a multiple of its group size {state.group_size}, and "
                          "compressed-tensors has no partial last group; use a group size that divides "
                          f"{columns}, or per-channel, for it.")
    return CtScheme(state.bits, state.group_size, state.symmetric)


def _scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are stored in. compressed-tensors dequantizes in the scale's dtype: float16 ones decode a
    float16 model exactly (an integer times a float16 value is exact in float32, then rounded once, as the engine
    does), but a bfloat16 or float32 model needs float32 ones to decode bit for bit. (vLLM and transformers cast
    scales to the model's dtype, so on a bfloat16 model they see bfloat16-rounded scales whatever is stored.)"""
    return torch.float16 if weight_dtype == torch.float16 else torch.float32


def _check_no_simulation(model) -> None:
    """Simulated activation / KV-cache quantization would silently vanish from the export: say so instead."""
    if getattr(model, HOOKS_ATTRIBUTE, None):
        raise ShrinkError("The plan simulates int8 activations or a quantized KV cache, which the compressed-tensors "
                          "export (weights only, W4A16 / W8A16) does not write; remove activation_bits and "
                          "kv_cache_bits from the plan to export.")


def _check_all_exported(report, schemes: dict[str, CtScheme]) -> None:
    """Every module the plan stores in fewer than 16 bits (a tied follower, 0 bytes, is stored at its owner) must
    be one the export packs."""
    for row in report.modules:
        name = report.current_names.get(row.name, row.name)
        low_bit = row.bits is not None and row.bits < 16 and row.packed_bytes > 0
        if low_bit and row.action != "remove" and name not in schemes:
            raise ShrinkError(f"{name} is stored as {row.action}, which compressed-tensors cannot express; use an "
                              "int4 or int8 rtn/gptq weight spec for it.")


def compressed_state_dict(model, report) -> tuple[dict[str, torch.Tensor], dict[str, CtScheme], dict[str, float]]:
    """(tensors to save, scheme per quantized module, max |decoded - model weight| per quantized module).

    Quantized Linears get weight_packed / weight_scale / weight_shape (+ weight_zero_point when asymmetric); every
    other tensor is saved as the model holds it; a weight shared by two modules (tied) is written once."""
    _check_no_simulation(model)
    states = {report.current_names.get(n, n): s for n, s in report.quant_states.items()}
    modules = dict(model.named_modules())
    state_dict = native_state_dict(model)
    owners: dict[int, str] = {}
    for key, tensor in state_dict.items():
        owners.setdefault(tensor.data_ptr(), key)
    tensors = {key: t.contiguous() for key, t in state_dict.items() if owners[t.data_ptr()] == key}
    schemes, deviation = {}, {}
    for name, state in states.items():
        module, key = modules.get(name), f"{name}.weight"
        if module is None or key not in state_dict:
            raise ShrinkError(f"{name} is not stored as {key} in the model's own layout (a transposed Conv1D or "
                              "fused-expert weight), which compressed-tensors cannot pack; keep it in float in the "
                              "plan to export.")
        shared = sum(t.data_ptr() == state_dict[key].data_ptr() for t in state_dict.values()) > 1
        schemes[name] = _scheme_for(name, module, state, shared)
        weight = module.weight.data
        codes = quantize(weight, state.scale, state.zero, state.bits, state.group_size)  # (out, in) uint8
        restored = dequantize(codes, state.scale, state.zero, state.group_size, weight.dtype)
        deviation[name] = float((restored.float() - weight.float()).abs().max()) if weight.numel() else 0.0
        del tensors[key]
        tensors[f"{name}.weight_packed"] = pack_int32(codes, state.bits)
        tensors[f"{name}.weight_scale"] = state.scale.to(_scale_dtype(weight.dtype)).contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(list(weight.shape), dtype=torch.int64)
        if not state.symmetric:  # (out, groups), packed along the output dimension
            tensors[f"{name}.weight_zero_point"] = pack_int32(state.zero.to(torch.int64).T, state.bits).T.contiguous()
    _check_all_exported(report, schemes)
    return tensors, schemes, deviation


def targets_and_ignore(model, schemes: dict[str, CtScheme]) -> tuple[dict[CtScheme, list[str]], list[str]]:
    """Modules per scheme (model order) and every other Linear (lm_head included) by exact name."""
    targets: dict[CtScheme, list[str]] = {}
    ignore = []
    for name, module in model.named_modules():
        if name in schemes:
            targets.setdefault(schemes[name], []).append(name)
        elif isinstance(module, torch.nn.Linear):
            ignore.append(name)
    return targets, ignore


def vllm_problems(report, schemes: dict[str, CtScheme]) -> list[str]:
    """One sentence per module set vLLM fuses into one layer (q/k/v, gate/up) whose members differ in scheme."""
    by_group: dict[tuple, dict[str, CtScheme | None]] = {}
    for row in report.modules:
        family = next((kinds for kinds in FUSED_KINDS if row.kind in kinds), None)
        if family is None or row.block is None or row.action == "remove":
            continue
        name = report.current_names.get(row.name, row.name)
        by_group.setdefault((row.block, family), {})[name] = schemes.get(name)
    problems = []
    for (block, family), members in sorted(by_group.items()):
        if len(set(members.values())) > 1:
            listed = ", ".join(f"{n.rsplit('.', 1)[-1]} {s.label() if s else 'float'}" for n, s in members.items())
            problems.append(f"block {block}: vLLM fuses {'/'.join(family)} into one layer with one scheme, but they "
                            f"differ ({listed})")
    return problems


def write_compressed_tensors(model, tokenizer, report, out_dir, provenance: dict, *, for_vllm: bool = True) -> Path:
    """Write a compressed-tensors directory (config.json, model.safetensors, tokenizer, provenance.json) for the
    compressed `model` and its ApplyReport; returns its path. `for_vllm` refuses plans vLLM cannot load (schemes that
    differ inside a fused q/k/v or gate/up set); transformers loads those too."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    problems = sync_config_(model)
    if problems:
        raise ShrinkError(f"The pruned model cannot be exported: {problems[0]}")
    tensors, schemes, deviation = compressed_state_dict(model, report)
    if not schemes:
        raise ShrinkError("The plan quantizes no Linear weight to int4 or int8, so there is nothing for a "
                          "compressed-tensors export to pack; save the candidate as it is instead.")
    fused = vllm_problems(report, schemes) if for_vllm else []
    if fused:
        raise ShrinkError(f"vLLM cannot load this plan as compressed-tensors: {fused[0]}; give those modules one "
                          "weight spec, or export with for_vllm=False for transformers only.")
    targets, ignore = targets_and_ignore(model, schemes)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    config.quantization_config = quantization_config(targets, ignore)
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    record = {
        "format": f"compressed-tensors {CT_FORMAT}",
        "code_version": __version__,
        "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **provenance,
        "schemes": {scheme.label(): len(names) for scheme, names in targets.items()},
        "file_bytes": (tmp / WEIGHTS_FILE).stat().st_size,
        # the exported codes decode to the model's weights exactly unless a method left them off the grid
        "max_abs_weight_deviation": max(deviation.values()),
        "notes": report.notes,
    }
    (tmp / "provenance.json").write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir
