"""Projected latency: a roofline model of one forward step (bytes moved, FLOPs, operator launches) per target.

time(step) = max(bytes / (bandwidth * bandwidth_efficiency), FLOPs / (peak[float_dtype] * compute_efficiency))
             + launches * launch_overhead
(the max becomes a sum on rows with overlap = false: a single-threaded eager CPU run does not hide one behind the other)
A storage format counts only where the target runs it fast: quantized weights without a kernel there are read at the
target's float width, and sparsity the target cannot exploit is read and computed dense (with a note saying so).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from shrink_core.perf.hardware import Hardware
from shrink_core.perf.workload import ModuleWeights, Workload

FLOAT_WIDTH = {"fp32": 32, "bf16": 16, "fp16": 16, "fp8": 8, "int8": 8}
INDEX_BITS = 16  # column index per kept value in a CSR-like unstructured sparse format
EXTRA_LAUNCHES = 5  # embedding, final norm, lm_head, sampling


@dataclass(frozen=True)
class StepCost:
    bytes: float  # weights as the target stores them + KV cache read
    weight_bytes: float
    flops: float
    launches: int


@dataclass(frozen=True)
class Projection:
    target: str
    batch: int
    prompt_tokens: int
    decode_tokens: int
    prefill_ms_per_token: float
    decode_ms_per_token: float
    prefill_bound: str  # "memory" | "compute" | "launch overhead"
    decode_bound: str
    weight_read_bytes: float  # per forward step, as the target would store the weights
    notes: tuple[str, ...]
    model: str  # what the projection rests on

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000 * self.batch / self.decode_ms_per_token

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1000 / self.prefill_ms_per_token

    def to_dict(self) -> dict:
        return {"kind": "projected", "target": self.target, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                "decode_tokens": self.decode_tokens, "prefill_ms_per_token": round(self.prefill_ms_per_token, 5),
                "decode_ms_per_token": round(self.decode_ms_per_token, 5),
                "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 1),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 1), "prefill_bound": self.prefill_bound,
                "decode_bound": self.decode_bound, "weight_read_bytes": int(self.weight_read_bytes),
                "notes": list(self.notes), "model": self.model}


def module_format(module: ModuleWeights, hardware: Hardware) -> tuple[float, float, str | None]:
    """(bytes read per step, FLOP factor vs dense, note) for one streamed module on `hardware`."""
    float_bits = FLOAT_WIDTH[hardware.float_dtype]
    note = None
    if module.bits < 16 and module.bits in hardware.lowbit_weight_bits:
        read, bits = float(module.read_bytes), module.bits
    else:
        if module.bits < 16:
            note = f"int{module.bits} has no fast kernel on {hardware.name}: projected at {hardware.float_dtype}"
        bits = float_bits
        read = module.numel * float_bits / 8
    pattern, share = module.sparse_pattern, module.zero_share
    if pattern == "2:4" and "2:4" in hardware.sparse_patterns:
        return read * (0.5 + 0.5 * 2 / bits), 0.5, None  # half the values + 2 bits of metadata per kept value
    if pattern == "unstructured" and "unstructured" in hardware.sparse_patterns and share >= hardware.unstructured_min_sparsity:
        return module.numel * (1 - share) * (bits + INDEX_BITS) / 8, 1 - share, None
    if pattern:
        sparse_note = (f"no speedup from {pattern} sparsity ({share:.0%} zeros): {hardware.name} has no fast kernel "
                       f"for it at this sparsity, projected dense")
        note = f"{note}; {sparse_note}" if note else sparse_note
    return read, 1.0, note


def step_cost(workload: Workload, hardware: Hardware, batch: int, new_tokens: int, context: float,
              kv_bits: int | None = None) -> tuple[StepCost, tuple[str, ...]]:
    """Bytes, FLOPs and launches of one forward step that adds `new_tokens` per sequence after `context` tokens."""
    kv_bits = kv_bits or FLOAT_WIDTH[hardware.float_dtype]
    weight_bytes, flops, notes = 0.0, 0.0, []
    for module in workload.modules:
        if not module.streamed:
            continue
        read, flop_factor, note = module_format(module, hardware)
        weight_bytes += read
        flops += 2 * module.numel * flop_factor * batch * new_tokens
        if note and note not in notes:
            notes.append(note)
    attention = workload.heads * workload.head_dim * workload.layers
    flops += 4 * attention * batch * new_tokens * (context + (new_tokens + 1) / 2)  # QK^T and AV, causal
    kv = batch * (context + new_tokens) * workload.kv_bytes_per_token(kv_bits)
    launches = workload.layers * workload.ops_per_layer + EXTRA_LAUNCHES
    return StepCost(weight_bytes + kv, weight_bytes, flops, launches), tuple(notes)


def step_seconds(cost: StepCost, hardware: Hardware) -> tuple[float, str]:
    memory = cost.bytes / (hardware.bandwidth_bytes_per_s * hardware.bandwidth_efficiency)
    compute = cost.flops / (hardware.peak_flops[hardware.float_dtype] * hardware.compute_efficiency)
    overhead = cost.launches * hardware.launch_overhead_s
    bound = "launch overhead" if overhead > max(memory, compute) else ("memory" if memory >= compute else "compute")
    return (max(memory, compute) if hardware.overlap else memory + compute) + overhead, bound


def project(workload: Workload, hardware: Hardware, batch: int = 1, prompt_tokens: int = 64,
            decode_tokens: int = 16, kv_bits: int | None = None) -> Projection:
    """Prefill and decode ms per token (same definitions as the measured figures) on `hardware`."""
    prefill_cost, notes = step_cost(workload, hardware, batch, prompt_tokens, 0, kv_bits)
    prefill_s, prefill_bound = step_seconds(prefill_cost, hardware)
    decode_cost, _ = step_cost(workload, hardware, batch, 1, prompt_tokens + decode_tokens / 2, kv_bits)
    decode_s, decode_bound = step_seconds(decode_cost, hardware)
    return Projection(
        target=hardware.name, batch=batch, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens,
        prefill_ms_per_token=1000 * prefill_s / (batch * prompt_tokens), decode_ms_per_token=1000 * decode_s,
        prefill_bound=prefill_bound, decode_bound=decode_bound,
        weight_read_bytes=decode_cost.weight_bytes,
        notes=notes, model=basis(hardware, decode_cost.launches),
    )


def basis(hardware: Hardware, launches: int) -> str:
    """What a projection on `hardware` rests on, in one line (shown with every projected figure)."""
    return (f"roofline ({hardware.name}: {hardware.bandwidth_bytes_per_s / 1e9:.0f} GB/s x "
            f"{hardware.bandwidth_efficiency:.2f}, {hardware.peak_flops[hardware.float_dtype] / 1e12:.2f} TFLOP/s "
            f"{hardware.float_dtype} x {hardware.compute_efficiency:.2f}, {hardware.launch_overhead_s * 1e6:.1f} us x "
            f"{launches} launches; {hardware.calibrated_from or hardware.source})")


def module_step_seconds(module: ModuleWeights, hardware: Hardware, batch: int = 1, new_tokens: int = 1) -> float:
    """One streamed module's own roofline time in a forward step.

    Summed over modules (plus `fixed_step_seconds`) this is linear in the per-module formats, so a planner can budget
    it; it bounds the whole-step roofline from above and equals it when every module is bound the same way (batch-1
    decode: all memory-bound).
    """
    read, flop_factor, _ = module_format(module, hardware)
    memory = read / (hardware.bandwidth_bytes_per_s * hardware.bandwidth_efficiency)
    compute = 2 * module.numel * flop_factor * batch * new_tokens / (
        hardware.peak_flops[hardware.float_dtype] * hardware.compute_efficiency)
    return max(memory, compute) if hardware.overlap else memory + compute


def fixed_step_seconds(workload: Workload, hardware: Hardware, batch: int = 1, context: float = 72,
                       kv_bits: int | None = None) -> float:
    """The decode step without its weights: KV-cache reads, attention FLOPs and operator launches."""
    cost, _ = step_cost(replace(workload, modules=()), hardware, batch, 1, context, kv_bits)
    return step_seconds(cost, hardware)[0]


def launch_overhead_from_step(step_seconds: float, workload: Workload) -> float:
    """Per-launch overhead from the measured step time of a same-depth toy (whose bytes and FLOPs are negligible)."""
    return step_seconds / (workload.layers * workload.ops_per_layer + EXTRA_LAUNCHES)


def relative_error(projected: float, measured: float) -> float:
    return (projected - measured) / measured


def calibrate(pairs, base: Hardware, bandwidth_bytes_per_s: float | None = None,
              launch_overhead_s: float | None = None) -> Hardware:
    """Fit bandwidth, float FLOP/s and launch overhead of `base` to measurements: pairs of (Workload, MeasuredLatency).

    Least squares on log time over a grid, for both overlap rules (max and sum), keeping the better; efficiencies
    become 1 (the fitted figures are the achieved ones).
    bandwidth_bytes_per_s: a measured bandwidth to hold fixed. One model alone cannot tell bandwidth from per-launch
    overhead (both are the same at every batch size), so a measured bandwidth keeps the fit physical.
    """
    import numpy as np

    if not pairs:
        raise ValueError("calibrate needs at least one (workload, measured latency) pair.")
    unit = replace(base, bandwidth_efficiency=1.0, compute_efficiency=1.0)
    rows = []  # (step cost, measured seconds of that step)
    for workload, measured in pairs:
        b, p, d = measured.batch, measured.prompt_tokens, measured.decode_tokens
        prefill, _ = step_cost(workload, unit, b, p, 0)
        decode, _ = step_cost(workload, unit, b, 1, p + d / 2)
        rows.append((prefill, measured.prefill_ms_per_token.median_ms * b * p / 1000))
        rows.append((decode, measured.decode_ms_per_token.median_ms / 1000))
    bytes_ = np.array([c.bytes for c, _ in rows])
    flops = np.array([c.flops for c, _ in rows])
    launches = np.array([c.launches for c, _ in rows])
    seconds = np.array([s for _, s in rows])
    peak = np.geomspace(1e9, 20e12, 200)[:, None, None]  # (peak, 1, 1)
    overhead = np.array([launch_overhead_s]) if launch_overhead_s is not None else \
        np.concatenate([[0.0], np.geomspace(1e-7, 1e-3, 200)])
    overhead = overhead[None, :, None]  # (1, overhead, 1)
    best = None
    for bandwidth in [bandwidth_bytes_per_s] if bandwidth_bytes_per_s else np.geomspace(1e9, 400e9, 120):
        for overlap in (True, False):
            memory, compute = bytes_ / bandwidth, flops / peak  # (rows,), (peak, 1, rows)
            predicted = (np.maximum(memory, compute) if overlap else memory + compute) + launches * overhead
            loss = (np.log(predicted / seconds) ** 2).sum(-1)  # (peak, overhead)
            j, k = np.unravel_index(int(loss.argmin()), loss.shape)
            if best is None or loss[j, k] < best[0]:
                best = (float(loss[j, k]), float(bandwidth), overlap, float(peak[j, 0, 0]), float(overhead[0, k, 0]))
    _, fitted_bandwidth, overlap, fitted_peak, fitted_overhead = best
    names = sorted({m.candidate for _, m in pairs})
    first = pairs[0][1]
    return replace(
        unit, bandwidth_bytes_per_s=fitted_bandwidth, overlap=overlap,
        peak_flops={**base.peak_flops, base.float_dtype: fitted_peak}, launch_overhead_s=fitted_overhead,
        calibrated_from=(f"fitted to {len(rows)} measured figures of {', '.join(names)} on {first.device}, "
                         f"{first.runtime}, {first.threads} threads, median of {first.runs} runs"
                         + (", bandwidth measured (batch-1 GEMVs)" if bandwidth_bytes_per_s else "")
                         + (", overhead measured (same-depth toy)" if launch_overhead_s is not None else "")
                         + f"; memory and compute {'overlap' if overlap else 'add up'} (better fit)"),
    )
