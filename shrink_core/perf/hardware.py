"""The editable target table: what each device can move, compute and run fast, and what an hour of it costs.

Figures are public spec-sheet peaks (dense, no sparsity) and typical on-demand prices; they are assumptions to edit,
not measurements. `load_table(path)` reads the same rows from a YAML/JSON file; a bad row is refused with one sentence.
The row "this-machine" is a placeholder until `roofline.calibrate()` fits it to measurements taken here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from shrink_core.errors import ShrinkError

DTYPES = ("fp32", "bf16", "fp16", "int8", "fp8")
SPARSE_PATTERNS = ("2:4", "unstructured")
TABLE_VERSION = 1


class HardwareTableError(ShrinkError):
    """A row of the hardware table is missing a field or holds an impossible value."""


@dataclass(frozen=True)
class Hardware:
    name: str
    kind: str  # "gpu" | "cpu"
    memory_bytes: int
    bandwidth_bytes_per_s: float  # peak memory bandwidth
    peak_flops: dict  # dtype -> dense FLOP/s, e.g. {"bf16": 989e12}
    float_dtype: str  # the float format unquantized weights and activations run in on this target
    launch_overhead_s: float  # per kernel / operator launch, as an eager runtime pays it
    price_per_hour: float | None  # dollars; None when the device is owned and no price is set
    lowbit_weight_bits: tuple = (4, 8)  # weight widths with fast weight-only kernels here
    sparse_patterns: tuple = ()  # "2:4" (sparse tensor cores) and/or "unstructured" (CPU sparse kernels)
    unstructured_min_sparsity: float = 0.7  # below this share, unstructured sparse kernels do not beat dense
    bandwidth_efficiency: float = 0.75  # achievable share of the peak bandwidth
    compute_efficiency: float = 0.5  # achievable share of the peak FLOPs
    overlap: bool = True  # memory traffic and compute overlap (time = max of both) or add up (time = sum)
    source: str = ""  # where the figures come from
    calibrated_from: str | None = None  # set when fitted to measurements
    version: int = field(default=TABLE_VERSION, compare=False)

    def __post_init__(self):
        where = f"Hardware row '{self.name or '?'}'"
        if not self.name or not isinstance(self.name, str):
            raise HardwareTableError("A hardware row has no name; give every row a unique name.")
        if self.kind not in ("gpu", "cpu"):
            raise HardwareTableError(f"{where}: kind must be 'gpu' or 'cpu', not {self.kind!r}.")
        for label, value in (("memory_bytes", self.memory_bytes), ("bandwidth_bytes_per_s", self.bandwidth_bytes_per_s)):
            if not isinstance(value, (int, float)) or value <= 0:
                raise HardwareTableError(f"{where}: {label} must be a positive number, not {value!r}.")
        if not isinstance(self.peak_flops, dict) or not self.peak_flops:
            raise HardwareTableError(f"{where}: peak_flops must map dtypes ({', '.join(DTYPES)}) to FLOP/s.")
        for dtype, flops in self.peak_flops.items():
            if dtype not in DTYPES or not isinstance(flops, (int, float)) or flops <= 0:
                raise HardwareTableError(
                    f"{where}: peak_flops[{dtype!r}] = {flops!r} is not a positive FLOP/s for a known dtype.")
        if self.float_dtype not in self.peak_flops:
            raise HardwareTableError(f"{where}: float_dtype {self.float_dtype!r} has no entry in peak_flops.")
        if not isinstance(self.launch_overhead_s, (int, float)) or not 0 <= self.launch_overhead_s < 0.01:
            raise HardwareTableError(
                f"{where}: launch_overhead_s must be seconds between 0 and 0.01, not {self.launch_overhead_s!r}.")
        if self.price_per_hour is not None and (not isinstance(self.price_per_hour, (int, float)) or self.price_per_hour < 0):
            raise HardwareTableError(
                f"{where}: price_per_hour must be a non-negative number or null, not {self.price_per_hour!r}.")
        if any(bits not in (2, 3, 4, 5, 6, 8) for bits in self.lowbit_weight_bits):
            raise HardwareTableError(f"{where}: lowbit_weight_bits {self.lowbit_weight_bits!r} holds a width outside 2-8.")
        if any(p not in SPARSE_PATTERNS for p in self.sparse_patterns):
            raise HardwareTableError(f"{where}: sparse_patterns {self.sparse_patterns!r} may hold only {SPARSE_PATTERNS}.")
        if not isinstance(self.overlap, bool):
            raise HardwareTableError(f"{where}: overlap must be true or false, not {self.overlap!r}.")
        for label, value in (("bandwidth_efficiency", self.bandwidth_efficiency), ("compute_efficiency", self.compute_efficiency),
                             ("unstructured_min_sparsity", self.unstructured_min_sparsity)):
            if not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise HardwareTableError(f"{where}: {label} must be a share in (0, 1], not {value!r}.")

    def to_dict(self) -> dict:
        row = asdict(self)
        row["lowbit_weight_bits"] = list(self.lowbit_weight_bits)
        row["sparse_patterns"] = list(self.sparse_patterns)
        return row


GB = 1e9
GIB = 1024**3
_NV = ("2:4",)  # Ampere and later: sparse tensor cores

DEFAULT_ROWS = (
    Hardware("h100-sxm", "gpu", 80 * GIB, 3.35e12, {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12, "fp8": 1979e12,
             "int8": 1979e12}, "bf16", 5e-6, 3.00, (4, 8), _NV, source="NVIDIA H100 SXM datasheet; price: typical cloud"),
    Hardware("a100-80gb", "gpu", 80 * GIB, 2.039e12, {"fp32": 19.5e12, "bf16": 312e12, "fp16": 312e12, "int8": 624e12},
             "bf16", 5e-6, 1.80, (4, 8), _NV, source="NVIDIA A100 SXM 80GB datasheet; price: typical cloud"),
    Hardware("l4", "gpu", 24 * GIB, 300 * GB, {"fp32": 30.3e12, "bf16": 121e12, "fp16": 121e12, "fp8": 242e12,
             "int8": 242e12}, "bf16", 5e-6, 0.80, (4, 8), _NV, source="NVIDIA L4 datasheet; price: typical cloud"),
    Hardware("a10g", "gpu", 24 * GIB, 600 * GB, {"fp32": 31.2e12, "bf16": 70e12, "fp16": 70e12, "int8": 140e12},
             "bf16", 5e-6, 1.00, (4, 8), _NV, source="AWS A10G (g5) figures; price: on-demand g5.xlarge"),
    Hardware("rtx-4090", "gpu", 24 * GIB, 1.008e12, {"fp32": 82.6e12, "bf16": 165e12, "fp16": 165e12, "fp8": 330e12,
             "int8": 330e12}, "bf16", 5e-6, 0.40, (4, 8), _NV, source="NVIDIA Ada whitepaper; price: community cloud"),
    Hardware("x86-server-cpu", "cpu", 512 * GIB, 307 * GB, {"fp32": 7.2e12, "bf16": 58e12, "int8": 115e12}, "bf16",
             10e-6, 2.50, (4, 8), ("unstructured",), bandwidth_efficiency=0.6, compute_efficiency=0.4,
             source="56-core Xeon (Sapphire Rapids, AMX), 8x DDR5-4800; price: typical cloud 1 socket"),
    Hardware("apple-m3-max", "gpu", 64 * GIB, 400 * GB, {"fp32": 14.2e12, "fp16": 28.4e12, "bf16": 28.4e12}, "fp16",
             8e-6, None, (4, 8), (), source="Apple M3 Max (40-core GPU), unified memory; owned: no price set"),
    Hardware("raspberry-pi-5", "cpu", 8 * GIB, 17 * GB, {"fp32": 153.6e9, "fp16": 307e9, "int8": 307e9}, "fp32",
             20e-6, 0.005, (4, 8), (), bandwidth_efficiency=0.5, compute_efficiency=0.4,
             source="4x Cortex-A76 2.4 GHz NEON, LPDDR4X-4267 32-bit; price: $80 over 3 years + power"),
    Hardware("this-machine", "cpu", 24 * GIB, 20 * GB, {"fp32": 100e9, "bf16": 100e9}, "fp32", 20e-6, None, (4, 8), (),
             source="placeholder: run roofline.calibrate() on measurements taken here"),
)
DEFAULT_TARGET = "h100-sxm"  # the projection target every page and command starts with


def table_from_rows(rows) -> tuple[Hardware, ...]:
    """Validate a list of row dicts (unknown keys and duplicate names are refused with one sentence)."""
    allowed = set(Hardware.__dataclass_fields__)
    table, seen = [], set()
    for index, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise HardwareTableError(f"Hardware row {index} is not a mapping of field names to values.")
        unknown = sorted(set(row) - allowed)
        if unknown:
            raise HardwareTableError(f"Hardware row {index} has unknown field(s) {', '.join(unknown)}; remove or rename them.")
        missing = [f for f in ("name", "kind", "memory_bytes", "bandwidth_bytes_per_s", "peak_flops", "float_dtype",
                               "launch_overhead_s", "price_per_hour") if f not in row]
        if missing:
            raise HardwareTableError(f"Hardware row {index} ({row.get('name', '?')}) lacks field(s) {', '.join(missing)}.")
        values = dict(row)
        for key in ("lowbit_weight_bits", "sparse_patterns"):
            if key in values:
                values[key] = tuple(values[key])
        hardware = Hardware(**values)
        if hardware.name in seen:
            raise HardwareTableError(f"Hardware row {index} repeats the name '{hardware.name}'; names must be unique.")
        seen.add(hardware.name)
        table.append(hardware)
    return tuple(table)


def load_table(path: str | Path) -> tuple[Hardware, ...]:
    """Rows from a YAML or JSON file: a list of mappings, or {"version": 1, "rows": [...]}."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HardwareTableError(f"The hardware table {path} does not exist; check the path.")
    data = yaml.safe_load(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise HardwareTableError(f"The hardware table {path} must be a list of rows (or a mapping with 'rows').")
    return table_from_rows(rows)


def get(name: str, table: tuple[Hardware, ...] = DEFAULT_ROWS) -> Hardware:
    for row in table:
        if row.name == name:
            return row
    raise HardwareTableError(f"Unknown target '{name}'; choose one of: {', '.join(r.name for r in table)}.")
