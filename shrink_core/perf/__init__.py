"""Latency, memory and cost: measured where it can be (this machine), projected where it cannot (a roofline over an
editable hardware table), and never confused: every result's `to_dict()` labels its figures."""
from shrink_core.perf.candidate import Candidate, reference
from shrink_core.perf.cost import CostEstimate, cost_estimate, dollars_per_million
from shrink_core.perf.hardware import DEFAULT_ROWS, Hardware, HardwareTableError, get, load_table, table_from_rows
from shrink_core.perf.latency import Bandwidth, MeasuredLatency, Timing, measure_bandwidth, measure_latency
from shrink_core.perf.lowbit import LowbitReport, lowbit_copy
from shrink_core.perf.memory import MemoryReport, PeakMemory, kv_cache_bytes, measure_peak_rss, memory_report
from shrink_core.perf.report import PerfReport, measure
from shrink_core.perf.roofline import Projection, calibrate, project
from shrink_core.perf.workload import ModuleWeights, Workload, describe_model, uniform_bits

__all__ = [
    "Candidate", "reference", "CostEstimate", "cost_estimate", "dollars_per_million", "DEFAULT_ROWS",
    "Hardware", "HardwareTableError", "get", "load_table", "table_from_rows", "Bandwidth", "MeasuredLatency", "Timing",
    "measure_bandwidth", "measure_latency", "LowbitReport", "lowbit_copy", "MemoryReport", "PeakMemory",
    "kv_cache_bytes", "measure_peak_rss", "memory_report", "PerfReport", "measure", "Projection", "calibrate",
    "project", "ModuleWeights", "Workload", "describe_model", "uniform_bits",
]
