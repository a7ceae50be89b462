"""The menu of settings: every named (weight format or pruning mask) a module can be scanned at or planned to.

One definition for the sensitivity scan, the planner, the Plan page's table and the CLI. A setting is measured with
its calibration-free method (round-to-nearest, magnitude masks); a plan may apply the same format with GPTQ.
"""
from __future__ import annotations

from dataclasses import dataclass

from shrink_core.errors import ShrinkError
from shrink_core.formats import GGML_TYPES, ggml_geometry


@dataclass(frozen=True)
class Setting:
    id: str
    label: str
    bits: int | None = None  # quantization: round-to-nearest at these bits
    group_size: int | None = None  # None = per output channel
    symmetric: bool = False
    prune: str | None = None  # "nm24" (2:4 magnitude) | "magnitude50" (50% unstructured magnitude)
    ggml: str | None = None  # a llama.cpp type (bits is then its nominal width): its blocks, its reference quantizer
    version: int = 2  # 2: a group that does not divide the row leaves a partial last group (was per-channel)

    def __post_init__(self):
        if (self.bits is None) == (self.prune is None):
            raise ShrinkError(f"Setting '{self.id}' must either quantize or prune, not both or neither.")

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    def weights(self) -> dict:
        """The weight format as WeightSpec fields (quantizing settings only)."""
        if self.ggml is not None:
            return {"ggml": self.ggml, "bits": self.bits, "group_size": None, "symmetric": False}
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    def plan_action(self) -> dict:
        """The plan-rule action that applies this setting (round-to-nearest, magnitude masks: what was measured)."""
        if self.ggml is not None:
            return {"weights": {"ggml": self.ggml, "method": "rtn"}}
        if self.bits is not None:
            return {"weights": {"bits": self.bits, "group_size": self.group_size or "channel",
                                "symmetric": self.symmetric, "method": "rtn"}}
        if self.prune == "nm24":
            return {"prune": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"}}
        return {"prune": {"structure": "unstructured", "amount": 0.5, "criterion": "magnitude"}}


# llama.cpp's types on the menu (exact bits per weight on rows their blocks tile; other rows fall back, see formats)
GGML_MENU = {name: ggml_geometry(name)[1] * 8 / ggml_geometry(name)[0]
             for name in ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_XS", "Q3_K", "Q2_K")}

MENU: dict[str, Setting] = {
    s.id: s
    for s in (
        Setting("w8", "int8 per-channel symmetric (RTN)", bits=8, symmetric=True),
        Setting("w6g64", "int6 group 64 asymmetric (RTN)", bits=6, group_size=64),
        Setting("w4g128", "int4 group 128 asymmetric (RTN)", bits=4, group_size=128),
        Setting("w4g64", "int4 group 64 asymmetric (RTN)", bits=4, group_size=64),
        Setting("w4g32", "int4 group 32 asymmetric (RTN)", bits=4, group_size=32),
        Setting("w3g128", "int3 group 128 asymmetric (RTN)", bits=3, group_size=128),
        Setting("w3g64", "int3 group 64 asymmetric (RTN)", bits=3, group_size=64),
        Setting("w3g32", "int3 group 32 asymmetric (RTN)", bits=3, group_size=32),
        Setting("w2g128", "int2 group 128 asymmetric (RTN)", bits=2, group_size=128),
        Setting("w2g64", "int2 group 64 asymmetric (RTN)", bits=2, group_size=64),
        Setting("w2g32", "int2 group 32 asymmetric (RTN)", bits=2, group_size=32),
        *(Setting(name.lower(), f"{name} (llama.cpp, {bpw:.4g} bits/weight where rows allow)", bits=GGML_TYPES[name],
                  ggml=name)
          for name, bpw in GGML_MENU.items()),
        Setting("nm24", "2:4 sparsity (magnitude)", prune="nm24"),
        Setting("prune50", "50% unstructured sparsity (magnitude)", prune="magnitude50"),
    )
}
# What the planner chooses among (besides "keep"): the quantizing settings, as WeightSpec fields.
QUANT_SETTINGS: dict[str, dict] = {s.id: s.weights() for s in MENU.values() if s.quantizes}
SCAN_DEFAULT = ("w4g64", "w3g64")
PLANNER_DEFAULT = ("w8", "w4g64", "w3g64", "w2g64")


def get_setting(setting_id: str) -> Setting:
    if setting_id not in MENU:
        raise ShrinkError(f"Unknown setting '{setting_id}'; choose from: {', '.join(MENU)}.")
    return MENU[setting_id]


def parse_settings(text: str) -> list[Setting]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ShrinkError("No settings given; pass e.g. --settings w4g64,w3g64.")
    return [get_setting(i) for i in ids]


def setting_name(bits: int | None, group_size: int | None, symmetric: bool, keep: bool = False,
                 ggml: str | None = None) -> str:
    """The menu's name for a weight format: "keep", "fp16", a setting id, or "custom (...)" off the menu."""
    if keep or bits in (None, 32):
        return "keep"
    if ggml is not None:
        return ggml.lower()  # every llama.cpp type a plan can name is a menu id (those off GGML_MENU score as custom)
    if bits == 16:
        return "fp16"
    for setting_id, spec in QUANT_SETTINGS.items():
        if "ggml" not in spec and (spec["bits"], spec["group_size"], spec["symmetric"]) == (bits, group_size,
                                                                                           bool(symmetric)):
            return setting_id
    return f"custom ({bits}-bit, group {'channel' if group_size is None else group_size})"
