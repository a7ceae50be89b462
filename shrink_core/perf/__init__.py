"""Latency, memory and cost: measured where it can be (this machine), projected where it cannot (a roofline over an
editable hardware table), and never confused: every result's `to_dict()` labels its figures."""
from .candidate import Candidate, from_plan, reference
from .cost import CostEstimate, cost_estimate, dollars_per_million
from .hardware import DEFAULT_ROWS, Hardware, HardwareTableError, get, load_table, table_from_rows
from .latency import Bandwidth, MeasuredLatency, Timing, measure_bandwidth, measure_latency
from .lowbit import LowbitReport, lowbit_copy
from .memory import MemoryReport, PeakMemory, kv_cache_bytes, measure_peak_rss, memory_report
from .report import PerfReport, measure
from .roofline import Projection, calibrate, project
from .workload import ModuleWeights, QuantSpec, Workload, describe_model, uniform_bits

__all__ = [
    "Candidate", "from_plan", "reference", "CostEstimate", "cost_estimate", "dollars_per_million", "DEFAULT_ROWS",
    "Hardware", "HardwareTableError", "get", "load_table", "table_from_rows", "Bandwidth", "MeasuredLatency", "Timing",
    "measure_bandwidth", "measure_latency", "LowbitReport", "lowbit_copy", "MemoryReport", "PeakMemory",
    "kv_cache_bytes", "measure_peak_rss", "memory_report", "PerfReport", "measure", "Projection", "calibrate",
    "project", "ModuleWeights", "QuantSpec", "Workload", "describe_model", "uniform_bits",
]
