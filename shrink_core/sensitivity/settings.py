"""What a module is scored under: a setting from the one menu (`plan/menu.py`), applied as a perturbation of a weight."""
from __future__ import annotations

import torch

from shrink_core.compression.ggml.types import quantize_dequantize
from shrink_core.compression.primitives import by_row_blocks, fake_quantize
from shrink_core.compression.prune import magnitude_mask, nm_mask
from shrink_core.plan.menu import MENU as SETTINGS
from shrink_core.plan.menu import Setting, get_setting, parse_settings

__all__ = ["SETTINGS", "Setting", "get_setting", "parse_settings", "perturbed", "row_independent", "weight_error"]




def row_independent(setting: Setting, weight: torch.Tensor | None = None) -> bool:
    """True when the setting treats each row of a (2-D) weight on its own: its error on a block of rows is the same
    as the whole matrix's error on those rows. Unstructured magnitude pruning ranks the whole matrix."""
    return setting.prune in (None, "nm24") and (weight is None or weight.dim() == 2)


def perturbed(setting: Setting, weight: torch.Tensor) -> torch.Tensor:
    """The weight as `setting` leaves it (out, in), in the weight's dtype; a new tensor, the argument is untouched.
    Scales and rounding are computed in float32 whatever the model runs in, a block of rows at a time where the
    setting treats rows independently (`by_row_blocks`)."""
    if row_independent(setting, weight):
        return by_row_blocks(weight, lambda part: _perturbed32(setting, part))
    return _perturbed32(setting, weight.float()).to(weight.dtype)


def weight_error(setting: Setting, weight: torch.Tensor) -> torch.Tensor:
    """perturbed(setting, w) - w in float32 (out, in), w the weight in float32: the same bits as that expression, a
    block of rows at a time where rows are independent, so no float32 copy of the whole weight (235 MB for an 8B
    gate_proj in bf16) exists beside the error."""
    if row_independent(setting, weight):
        return by_row_blocks(weight, lambda part: _perturbed32(setting, part) - part, torch.float32)
    weight = weight.float()
    return perturbed(setting, weight) - weight


def _perturbed32(setting: Setting, weight: torch.Tensor) -> torch.Tensor:
    if setting.ggml is not None:  # llama.cpp's blocks (or the type its row width falls back to), reference quantizer
        return quantize_dequantize(weight, setting.ggml)[0]
    mask = None
    if setting.prune is not None:  # the mask from the original weight, as the engine's rule with both does
        mask = nm_mask(weight.abs(), 2, 4) if setting.prune == "nm24" else magnitude_mask(weight, 0.5)
        weight = weight * mask
    if setting.bits is not None:  # a partial last group is quantized as the engine applies it (primitives); the
        weight = fake_quantize(weight, setting.bits, setting.group_size, setting.symmetric,  # scales see the zeros
                               scales=setting.scales)
        weight = weight if mask is None else weight * mask
    return weight
