"""What a module is scored under: a setting is one perturbation (RTN quantization or a pruning mask) of a weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink_core.errors import ShrinkError
from shrink_core.compression.prune import magnitude_mask, nm_mask
from shrink_core.compression.primitives import fake_quantize


@dataclass(frozen=True)
class Setting:
    id: str
    label: str
    bits: int | None = None  # quantization: round-to-nearest at these bits
    group_size: int | None = None  # None = per output channel
    symmetric: bool = False
    prune: str | None = None  # "nm24" (2:4 magnitude) | "magnitude50" (50% unstructured magnitude)
    version: int = 2  # 2: a group that does not divide the row leaves a partial last group (was per-channel)

    def __post_init__(self):
        if (self.bits is None) == (self.prune is None):
            raise ShrinkError(f"Setting '{self.id}' must either quantize or prune, not both or neither.")

    def perturbed(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight as this setting leaves it (out, in); a new tensor, the argument is untouched."""
        if self.bits is not None:  # a partial last group is quantized as the engine applies it (primitives)
            return fake_quantize(weight, self.bits, self.group_size, self.symmetric)
        if self.prune == "nm24":
            return weight * nm_mask(weight.abs(), 2, 4)
        return weight * magnitude_mask(weight, 0.5)

    def plan_action(self) -> dict:
        """The plan-rule action that applies this setting (round-to-nearest, magnitude masks: what was measured)."""
        if self.bits is not None:
            return {"weights": {"bits": self.bits, "group_size": self.group_size or "channel",
                                "symmetric": self.symmetric, "method": "rtn"}}
        if self.prune == "nm24":
            return {"prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}
        return {"prune": {"structure": "unstructured", "amount": 0.5, "criterion": "magnitude"}}


SETTINGS = {
    s.id: s
    for s in (
        Setting("w8", "int8 per-channel symmetric (RTN)", bits=8, symmetric=True),
        Setting("w4g64", "int4 group 64 asymmetric (RTN)", bits=4, group_size=64),
        Setting("w3g64", "int3 group 64 asymmetric (RTN)", bits=3, group_size=64),
        Setting("w2g64", "int2 group 64 asymmetric (RTN)", bits=2, group_size=64),
        Setting("nm24", "2:4 sparsity (magnitude)", prune="nm24"),
        Setting("prune50", "50% unstructured sparsity (magnitude)", prune="magnitude50"),
    )
}


def get_setting(setting_id: str) -> Setting:
    if setting_id not in SETTINGS:
        raise ShrinkError(f"Unknown setting '{setting_id}'; choose from: {', '.join(SETTINGS)}.")
    return SETTINGS[setting_id]


def parse_settings(text: str) -> list[Setting]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ShrinkError("No settings given; pass e.g. --settings w4g64,w3g64.")
    return [get_setting(i) for i in ids]
