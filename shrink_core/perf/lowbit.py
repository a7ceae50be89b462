"""A real low-bit CPU runtime: PyTorch eager with packed int4 / int8 weight-only linears (aten CPU kernels).

int4: `aten._weight_int4pack_mm_for_cpu` (the kernel torchao's CPU int4 layout and gpt-fast call), groups of
32/64/128/256 with a zero point (so symmetric and asymmetric grids both fit), bf16 activations. int8:
`aten._weight_int8pack_mm`, per output channel, bf16 activations. Both ship in torch itself, so the default install
measures them. What the runtime cannot express (other widths, other groupings, embeddings) stays in float and is
listed in the report, never silently measured as something else.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from shrink_core.formats import WeightFormat
from shrink_core.model.inventory import inventory

INT4_GROUPS = (32, 64, 128, 256)
RUNTIME_NAME = "pytorch-eager + aten int4pack/int8pack weight-only (bf16 activations)"


def _torch():
    import torch

    return torch


def pack_int4(weight, group_size: int, scale=None, zero=None, symmetric: bool = False):
    """Codes in [0, 15] per group -> (packed uint8 for the CPU kernel, scales_and_zeros, max |weight error|).

    weight (out, in) float. scale, zero (out, groups): the plan engine's grid (w = (q - zero) * scale); without them
    round-to-nearest min/max (asymmetric) or absmax (symmetric, zero 8). scales_and_zeros (groups, out, 2) bf16 as the
    kernel expects: w = (q - 8) * s + z, so z = (8 - zero) * s.
    """
    torch = _torch()
    out, inp = weight.shape
    grouped = weight.detach().float().reshape(out, inp // group_size, group_size)  # (out, groups, group)
    if scale is None:
        if symmetric:
            scale = (grouped.abs().amax(-1) / 7).clamp(min=1e-8)  # (out, groups)
            zero = torch.full_like(scale, 8.0)
        else:
            low, high = grouped.amin(-1), grouped.amax(-1)
            scale = ((high - low) / 15).clamp(min=1e-8)
            zero = -low / scale  # real-valued: min/max map exactly to 0 and 15
    scale, zero = scale.float(), zero.float()
    codes = grouped.div(scale[..., None]).add_(zero[..., None]).round_().clamp_(0, 15)  # (out, groups, group)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.reshape(out, inp).to(torch.int32), 1)
    scales_and_zeros = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).contiguous().to(torch.bfloat16)
    kernel_scale, kernel_zero = scales_and_zeros.float().permute(2, 1, 0)  # (out, groups) each, as the kernel sees them
    error = float((codes - 8).mul_(kernel_scale[..., None]).add_(kernel_zero[..., None]).sub_(grouped).abs_().max())
    return packed, scales_and_zeros, error


def pack_int8(weight, scale=None):
    """Symmetric per-output-channel codes -> (int8 weight (out, in), bf16 scales (out,), max |weight error|).

    scale (out, 1) or (out,): the plan engine's (w = (q - 128) * scale); without it absmax / 127.
    """
    torch = _torch()
    w = weight.detach().float()
    scale = (w.abs().amax(1) / 127).clamp(min=1e-8) if scale is None else scale.float().reshape(-1)  # (out,)
    codes = (w / scale[:, None]).round().clamp(-128, 127)
    kernel_scale = scale.to(torch.bfloat16)
    error = float((codes * kernel_scale.float()[:, None] - w).abs().max())
    return codes.to(torch.int8), kernel_scale, error


def _int4_linear_class():
    torch = _torch()

    class Int4WeightLinear(torch.nn.Module):
        def __init__(self, linear, group_size: int, symmetric: bool, state=None):
            super().__init__()
            self.out_features, self.in_features, self.group_size = linear.out_features, linear.in_features, group_size
            scale, zero = (state.scale, state.zero) if state is not None else (None, None)
            packed, scales_and_zeros, self.max_error = pack_int4(linear.weight, group_size, scale, zero, symmetric)
            self.register_buffer("packed", packed)
            self.register_buffer("scales_and_zeros", scales_and_zeros)
            self.bias = linear.bias

        def forward(self, x):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (tokens, in)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group_size, self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias

    return Int4WeightLinear


def _int8_linear_class():
    torch = _torch()

    class Int8WeightLinear(torch.nn.Module):
        def __init__(self, linear, state=None):
            super().__init__()
            self.out_features, self.in_features = linear.out_features, linear.in_features
            codes, scales, self.max_error = pack_int8(linear.weight, None if state is None else state.scale)
            self.register_buffer("codes", codes)
            self.register_buffer("scales", scales)
            self.bias = linear.bias

        def forward(self, x):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)  # (tokens, in)
            y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias

    return Int8WeightLinear


@dataclass(frozen=True)
class LowbitReport:
    runtime: str
    packed: tuple[str, ...]  # modules now running packed
    not_expressed: tuple[tuple[str, str], ...]  # (module, why it stays float)
    max_weight_error: float  # largest |kernel weight - given weight|: bf16 scale rounding only when given the grid

    @property
    def complete(self) -> bool:
        return not self.not_expressed

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "packed_modules": len(self.packed), "complete": self.complete,
                "not_expressed": [{"module": m, "why": why} for m, why in self.not_expressed],
                "max_weight_error": self.max_weight_error}


def why_not(spec: WeightFormat, module, state=None) -> str | None:
    """Why this runtime cannot run `module` with `spec` (and the engine's `state`) packed, or None when it can."""
    torch = _torch()
    if not isinstance(module, torch.nn.Linear):
        return f"{type(module).__name__} has no packed kernel here (linears only)"
    if spec.ggml is not None:
        return f"{spec.ggml} is a llama.cpp block format: measure it on llama.cpp (measure --runtime llama.cpp)"
    if getattr(state, "rotation", None) is not None:
        return "its codes are in a rotated input basis (the plan's rotate), and this runtime has no input rotation"
    if spec.bits == 4:
        if spec.group_size not in INT4_GROUPS:
            return f"int4 needs group size 32/64/128/256, not {spec.group_size}"
        if module.in_features % spec.group_size or module.out_features % 32:
            return f"int4 needs in_features divisible by the group and out_features by 32, not {tuple(module.weight.shape)}"
        return None
    if spec.bits == 8:
        if spec.group_size is not None:
            return f"int8 kernel is per output channel, not groups of {spec.group_size}"
        if not spec.symmetric or (state is not None and bool((state.zero != 128).any())):
            return "int8 kernel is symmetric (no zero point); an asymmetric plan would be re-rounded"
        return None
    return f"no {spec.bits}-bit kernel in this runtime (4 and 8 only)"


def lowbit_copy(model, bits: dict, states: dict | None = None):
    """A copy of `model` whose linears named in `bits` (name -> WeightFormat) run packed; returns (model, LowbitReport).

    states: name -> the plan engine's QuantState (.scale, .zero per group), so the codes are exactly the engine's.
    """
    states = states or {}
    Int4WeightLinear, Int8WeightLinear = _int4_linear_class(), _int8_linear_class()
    candidate = copy.deepcopy(model)
    packed, skipped, error = [], [], 0.0
    for row in inventory(candidate):
        spec = bits.get(row.name)
        if spec is None or spec.bits >= 16:
            continue
        module = candidate.get_submodule(row.name)
        state = states.get(row.name)
        reason = why_not(spec, module, state)
        if reason:
            skipped.append((row.name, reason))
            continue
        replacement = (Int4WeightLinear(module, spec.group_size, spec.symmetric, state) if spec.bits == 4
                       else Int8WeightLinear(module, state))
        parent_name, _, leaf = row.name.rpartition(".")
        setattr(candidate.get_submodule(parent_name) if parent_name else candidate, leaf, replacement)
        packed.append(row.name)
        error = max(error, replacement.max_error)
    return candidate, LowbitReport(RUNTIME_NAME, tuple(packed), tuple(skipped), error)
