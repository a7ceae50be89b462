"""The menu of settings: every named (weight format, pruning mask, or both) a module can be scanned at or planned to.

One definition for the sensitivity scan, the planner, the Plan page's table and the CLI. A setting is measured with
its calibration-free method (round-to-nearest, magnitude masks); a plan may apply the same format with GPTQ.
A setting that both masks and quantizes (`w4g64+nm24`) is applied as the engine applies such a rule: the magnitude
mask on the original weight, then round-to-nearest on what it keeps; its bytes are the sparse format's (kept values,
their scales and zeros, 2 bits of index per kept value), the size `eval` and the Plan page count.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from shrink_core.errors import ShrinkError
from shrink_core.formats import GGML_TYPES, ggml_geometry


@dataclass(frozen=True)
class Setting:
    id: str
    label: str
    bits: int | None = None  # quantization: round-to-nearest at these bits
    group_size: int | None = None  # None = per output channel
    symmetric: bool = False
    prune: str | None = None  # "nm24" (2:4 magnitude) | "magnitude50" (50% unstructured magnitude); with bits: both
    ggml: str | None = None  # a llama.cpp type (bits is then its nominal width): its blocks, its reference quantizer
    scales: str = "fp16"  # how group scales are stored (formats.SCALE_FORMATS)
    version: int = 2  # 2: a group that does not divide the row leaves a partial last group (was per-channel)

    def __post_init__(self):
        if self.bits is None and self.prune is None:
            raise ShrinkError(f"Setting '{self.id}' must quantize, prune, or both.")
        if self.ggml is not None and self.prune is not None:
            raise ShrinkError(f"Setting '{self.id}': llama.cpp's types store no sparsity, so they cannot also prune.")

    @property
    def quantizes(self) -> bool:
        return self.bits is not None

    @property
    def masks(self) -> bool:
        return self.prune is not None

    def key_fields(self) -> dict:
        """The fields a stored figure's key holds: fp16 scales left implied, so the keys of the settings that were on
        the menu before scale formats existed did not change (their stored scans stay served)."""
        fields = asdict(self)
        if fields["scales"] == "fp16":
            del fields["scales"]
        return fields

    def prune_fields(self) -> dict | None:
        """The mask as PruneSpec fields (masking settings only)."""
        return None if self.prune is None else dict(PRUNE_FIELDS[self.prune])

    def weights(self) -> dict:
        """The weight format as WeightSpec fields (quantizing settings only)."""
        if self.ggml is not None:
            return {"ggml": self.ggml, "bits": self.bits, "group_size": None, "symmetric": False}
        fields = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}
        return fields if self.scales == "fp16" else {**fields, "scales": self.scales}

    def plan_action(self) -> dict:
        """The plan-rule action that applies this setting (round-to-nearest, magnitude masks: what was measured)."""
        action = {}
        if self.ggml is not None:
            action["weights"] = {"ggml": self.ggml, "method": "rtn"}
        elif self.bits is not None:
            action["weights"] = {**self.weights(), "group_size": self.group_size or "channel", "method": "rtn"}
        if self.prune is not None:
            action["prune"] = self.prune_fields()
        return action


PRUNE_FIELDS = {"nm24": {"structure": "nm", "n": 2, "m": 4, "criterion": "magnitude"},
                "magnitude50": {"structure": "unstructured", "amount": 0.5, "criterion": "magnitude"}}


# llama.cpp's types on the menu (exact bits per weight on rows their blocks tile; other rows fall back, see formats)
GGML_MENU = {name: ggml_geometry(name)[1] * 8 / ggml_geometry(name)[0]
             for name in ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q4_K", "Q4_0", "IQ4_XS", "Q3_K", "Q2_K")}

MENU: dict[str, Setting] = {
    s.id: s
    for s in (
        Setting("w8", "int8 per-channel symmetric (RTN)", bits=8, symmetric=True),
        Setting("w6g64", "int6 group 64 asymmetric (RTN)", bits=6, group_size=64),
        # a step between 4 and 6 bits for the modules a plan lifts off 4 bits (5.2 bits per weight)
        Setting("w5g64-log8", "int5 group 64 asymmetric, log8 scales (RTN)", bits=5, group_size=64, scales="log8"),
        Setting("w4g128", "int4 group 128 asymmetric (RTN)", bits=4, group_size=128),
        Setting("w4g64", "int4 group 64 asymmetric (RTN)", bits=4, group_size=64),
        Setting("w4g32", "int4 group 32 asymmetric (RTN)", bits=4, group_size=32),
        # log8 scales at the groups the log8 presets use (q and o at w4g64-log8 in w4-log8-rot, q, k and o at
        # w3g64-log8 and early down_proj at w4g32-log8 in w3-log8-rot-tuned-hq): group 64 in about group 128's bytes
        Setting("w4g64-log8", "int4 group 64 asymmetric, log8 scales (RTN; about w4g128's bytes)", bits=4,
                group_size=64, scales="log8"),
        Setting("w4g32-log8", "int4 group 32 asymmetric, log8 scales (RTN; about w4g64's bytes)", bits=4,
                group_size=32, scales="log8"),
        Setting("w3g128", "int3 group 128 asymmetric (RTN)", bits=3, group_size=128),
        Setting("w3g64", "int3 group 64 asymmetric (RTN)", bits=3, group_size=64),
        Setting("w3g32", "int3 group 32 asymmetric (RTN)", bits=3, group_size=32),
        # group 32 with 8-bit log-grid scales and bits-bit zeros: within the bytes of the float16 group 64 setting
        Setting("w3g32-log8", "int3 group 32 asymmetric, log8 scales (RTN; w3g64's bytes)", bits=3, group_size=32,
                scales="log8"),
        Setting("w3g64-log8", "int3 group 64 asymmetric, log8 scales (RTN; about w3g128's bytes)", bits=3,
                group_size=64, scales="log8"),
        # the cheapest 3-bit tier: group 128 with log8 scales, about 0.1 bit a weight under w3g128
        Setting("w3g128-log8", "int3 group 128 asymmetric, log8 scales (RTN; under w3g128's bytes)", bits=3,
                group_size=128, scales="log8"),
        Setting("w2g128", "int2 group 128 asymmetric (RTN)", bits=2, group_size=128),
        Setting("w2g64", "int2 group 64 asymmetric (RTN)", bits=2, group_size=64),
        Setting("w2g32", "int2 group 32 asymmetric (RTN)", bits=2, group_size=32),
        Setting("w2g32-log8", "int2 group 32 asymmetric, log8 scales (RTN; w2g64's bytes)", bits=2, group_size=32,
                scales="log8"),
        *(Setting(name.lower(), f"{name} (llama.cpp, {bpw:.4g} bits/weight where rows allow)", bits=GGML_TYPES[name],
                  ggml=name)
          for name, bpw in GGML_MENU.items()),
        Setting("nm24", "2:4 sparsity (magnitude)", prune="nm24"),
        Setting("prune50", "50% unstructured sparsity (magnitude)", prune="magnitude50"),
        # 2:4 on top of a weight format: stored sparse, the bytes of a lower bit-width (w4g64+nm24 = w3g64's 3.375
        # bits per weight), so the planner can weigh a mask against fewer bits where the user allows pruning
        Setting("w8+nm24", "2:4 sparsity + int8 per-channel (magnitude mask, then RTN; 5 bits/weight stored sparse)",
                bits=8, symmetric=True, prune="nm24"),
        Setting("w6g64+nm24", "2:4 sparsity + int6 group 64 (magnitude mask, then RTN; 4.375 bits/weight sparse)",
                bits=6, group_size=64, prune="nm24"),
        Setting("w4g64+nm24", "2:4 sparsity + int4 group 64 (magnitude mask, then RTN; 3.375 bits/weight sparse)",
                bits=4, group_size=64, prune="nm24"),
    )
}
# Weight formats alone (no mask), as WeightSpec fields: the per-module table's weight column, naming a format.
QUANT_SETTINGS: dict[str, dict] = {s.id: s.weights() for s in MENU.values() if s.quantizes and not s.masks}
# What the planner chooses among (besides "keep"): every setting that quantizes, masked or not. A mask alone leaves
# values at the model's dtype (2:4 of fp32 stores 17 bits a weight, of bf16 9: more than w8), and the latency model
# credits no sparse kernel, so it would never be chosen; it stays a scan setting (the heatmaps show it).
PLANNER_SETTINGS: dict[str, Setting] = {s.id: s for s in MENU.values() if s.quantizes}
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
                 ggml: str | None = None, prune=None, scales: str = "fp16") -> str:
    """The menu's name for a weight format and mask: "keep", "fp16", a setting id, or "custom (...)" off the menu.
    prune: the module's PruneSpec (or its fields); a mask the menu has no setting for names a custom setting, never
    the weight format alone (which would score a pruned module as if only quantized)."""
    if keep:
        return "keep"
    if prune is not None:
        fields = prune if isinstance(prune, dict) else {k: getattr(prune, k)
                                                          for k in ("structure", "amount", "n", "m", "criterion")}
        quantized = bits not in (None, 32)
        for setting in MENU.values():
            mask = setting.prune_fields()
            if mask is None or any(fields.get(k) != v for k, v in mask.items()) or setting.ggml is not None:
                continue
            if (setting.bits is None and not quantized) or (quantized and ggml is None and (
                    setting.bits, setting.group_size, setting.symmetric, setting.scales)
                    == (bits, group_size, bool(symmetric), scales)):
                return setting.id
        where = "" if not quantized else f"{bits}-bit, group {'channel' if group_size is None else group_size}, "
        return f"custom ({where}pruned {fields.get('structure')})"
    if bits in (None, 32):
        return "keep"
    if ggml is not None:
        return ggml.lower()  # every llama.cpp type a plan can name is a menu id (those off GGML_MENU score as custom)
    if bits == 16:
        return "fp16"
    for setting_id, spec in QUANT_SETTINGS.items():
        if "ggml" not in spec and (spec["bits"], spec["group_size"], spec["symmetric"], spec.get("scales", "fp16")) \
                == (bits, group_size, bool(symmetric), scales):
            return setting_id
    stored = "" if scales == "fp16" else f", {scales} scales"
    return f"custom ({bits}-bit, group {'channel' if group_size is None else group_size}{stored})"
