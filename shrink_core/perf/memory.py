"""Memory: packed weight bytes, KV-cache bytes (pure math), peak resident memory of a real run (measured), fit."""
from __future__ import annotations

import resource
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from shrink_core.perf.hardware import Hardware
from shrink_core.perf.workload import Workload

RUNTIME_OVERHEAD_BYTES = 300 * 1024**2  # runtime, activations and allocator slack assumed on a target (projected)


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, context: int, batch: int, kv_bits: int = 16) -> int:
    """K and V for every layer, KV head, position and sequence: 2 * layers * kv_heads * head_dim * context * batch * bits/8."""
    return 2 * layers * kv_heads * head_dim * context * batch * kv_bits // 8


@dataclass(frozen=True)
class PeakMemory:
    """Resident memory of the process while a function ran (measured on this machine)."""

    peak_rss_bytes: int
    rss_before_bytes: int
    method: str  # "VmHWM after clear_refs" (this run only) | "ru_maxrss" (process lifetime peak)

    def to_dict(self) -> dict:
        return {"kind": "measured", "what": "resident set of this process while the run went (every model it holds "
                "counts)", "peak_rss_bytes": self.peak_rss_bytes, "rss_before_bytes": self.rss_before_bytes,
                "run_increase_bytes": self.peak_rss_bytes - self.rss_before_bytes, "method": self.method}


def _status_kib(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def measure_peak_rss(run: Callable[[], object]) -> PeakMemory:
    """Run `run()` and return the peak resident set size during it (Linux resets the peak via clear_refs)."""
    before = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM to the current RSS
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss"
    run()
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else None
    if peak is None:
        peak, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "ru_maxrss"
    return PeakMemory(peak * 1024, (before or 0) * 1024, method)


@dataclass(frozen=True)
class MemoryReport:
    weight_bytes: int
    weight_source: str  # "engine packed bytes" | "computed from bits per module"
    kv_cache_bytes: int
    context: int
    batch: int
    kv_bits: int
    peak: PeakMemory | None = None

    def fits(self, hardware: Hardware, overhead_bytes: int = RUNTIME_OVERHEAD_BYTES) -> dict:
        """Whether weights + KV cache + an assumed runtime overhead fit the target's memory (projected)."""
        need = self.weight_bytes + self.kv_cache_bytes + overhead_bytes
        return {"kind": "projected", "target": hardware.name, "needed_bytes": need,
                "device_bytes": hardware.memory_bytes, "fits": need <= hardware.memory_bytes,
                "assumes": f"weights as packed here + KV cache at {self.kv_bits} bits + "
                           f"{overhead_bytes / 1024**2:.0f} MiB runtime overhead"}

    def to_dict(self) -> dict:
        return {
            "weights": {"kind": "computed", "bytes": self.weight_bytes, "source": self.weight_source},
            "kv_cache": {"kind": "computed", "bytes": self.kv_cache_bytes, "context": self.context,
                         "batch": self.batch, "kv_bits": self.kv_bits},
            "peak_resident": self.peak.to_dict() if self.peak else None,
        }


def memory_report(workload: Workload, context: int, batch: int, kv_bits: int = 32,
                  peak: PeakMemory | None = None) -> MemoryReport:
    kv = kv_cache_bytes(workload.layers, workload.kv_heads, workload.head_dim, context, batch, kv_bits)
    return MemoryReport(workload.weight_bytes, workload.weight_source, kv, context, batch, kv_bits, peak)


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS (glibc keeps freed heap pages otherwise, so a job's
    resident memory would grow with every large temporary it ever made). A no-op where glibc is absent."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
