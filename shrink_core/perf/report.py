"""One candidate's performance picture: memory, measured latency (with the reference side by side), projected
latency on a target and on this machine (calibrated here, with its error), and cost. Every figure is labelled."""
from __future__ import annotations

from dataclasses import dataclass, replace

from shrink_core.perf.candidate import Candidate
from shrink_core.perf.cost import CostEstimate, cost_estimate
from shrink_core.perf.hardware import Hardware, get
from shrink_core.perf.latency import Bandwidth, MeasuredLatency, StepOverhead, measure_with_probes, one_run
from shrink_core.perf.lowbit import LowbitReport, lowbit_copy
from shrink_core.perf.memory import MemoryReport, measure_peak_rss, memory_report
from shrink_core.perf.roofline import Projection, calibrate, launch_overhead_from_step, project, relative_error
from shrink_core.perf.workload import Workload, describe_model


@dataclass(frozen=True)
class PerfReport:
    candidate: str
    workload: Workload
    memory: MemoryReport
    fits: dict
    measured: tuple[MeasuredLatency, ...]  # reference and candidate, interleaved in one run
    lowbit: LowbitReport | None
    projected: tuple[Projection, ...]
    this_machine: Hardware  # the "this-machine" row fitted to the reference's measurements
    bandwidth: Bandwidth  # measured here, interleaved with the latency runs, held fixed in the fit
    overhead: StepOverhead  # likewise
    projection_error: tuple[dict, ...]  # this-machine projection vs measurement, per candidate and batch
    cost: tuple[CostEstimate, ...]
    notes: tuple[str, ...]

    def speedup(self, batch: int) -> dict | None:
        """Reference / candidate measured medians at `batch` (None without a distinct candidate)."""
        rows = {m.candidate: m for m in self.measured if m.batch == batch}
        if len(rows) < 2 or "reference" not in rows:
            return None
        ref, cand = rows.pop("reference"), next(iter(rows.values()))
        return {"kind": "measured", "batch": batch,
                "prefill": ref.prefill_ms_per_token.median_ms / cand.prefill_ms_per_token.median_ms,
                "decode": ref.decode_ms_per_token.median_ms / cand.decode_ms_per_token.median_ms}

    def to_dict(self) -> dict:
        batches = sorted({m.batch for m in self.measured})
        return {
            "candidate": self.candidate,
            "workload": self.workload.to_dict(),
            "memory": {**self.memory.to_dict(), "fits": self.fits},
            "latency": {
                "measured": [m.to_dict() for m in self.measured],
                "speedup_vs_reference": [s for s in (self.speedup(b) for b in batches) if s],
                "lowbit_runtime": self.lowbit.to_dict() if self.lowbit else None,
                "projected": [p.to_dict() for p in self.projected],
                "this_machine_model": self.this_machine.to_dict(),
                "this_machine_bandwidth": self.bandwidth.to_dict(),
                "this_machine_step_overhead": self.overhead.to_dict(),
                "projection_error_here": list(self.projection_error),
            },
            "cost": [c.to_dict() for c in self.cost],
            "notes": list(self.notes),
        }


def measure(model, candidate: Candidate, target: Hardware, batches: tuple[int, ...] = (1, 4), prompt_tokens: int = 64,
            decode_tokens: int = 16, runs: int = 5, warmup: int = 1, threads: int | None = None, context: int = 2048,
            utilisation: float = 0.5, table: tuple[Hardware, ...] | None = None) -> PerfReport:
    """Measure `candidate` beside the reference `model` here, then project it on `target` and price it."""
    notes = list(candidate.notes)
    workload = describe_model(candidate.model, candidate.bits, candidate.name, candidate.packed, candidate.sparse)
    reference_workload = describe_model(model, name="reference")
    runnable, lowbit = candidate.model, None
    if candidate.bits:
        runnable, lowbit = lowbit_copy(candidate.model, candidate.bits, candidate.states)
        if not lowbit.complete:
            notes.append(f"{len(lowbit.not_expressed)} quantized modules cannot run packed here and ran as dequantized "
                         "floats (listed under lowbit_runtime.not_expressed)")
    models = {"reference": model}
    runtimes = {}
    if candidate.model is not model:
        models[candidate.name] = runnable
        if lowbit:
            runtimes[candidate.name] = lowbit.runtime
    measured, bandwidth, overhead = measure_with_probes(models, model, runtimes, batches, prompt_tokens, decode_tokens,
                                                        runs, warmup, threads)
    vocab = runnable.config.get_text_config().vocab_size
    peak = measure_peak_rss(lambda: one_run(runnable, max(batches), prompt_tokens, decode_tokens, vocab, seed=0))
    memory = memory_report(workload, context, max(batches), 32, peak)

    base = next((row for row in table or () if row.name == "this-machine"), get("this-machine"))
    here = calibrate([(reference_workload, m) for m in measured if m.candidate == "reference"], base,
                     bandwidth.bytes_per_s, launch_overhead_from_step(overhead.step_ms.median_ms / 1000, reference_workload))
    workloads = {"reference": reference_workload, candidate.name: workload}
    errors = []
    for m in measured:
        p = project(workloads[m.candidate], here, m.batch, prompt_tokens, decode_tokens, kv_bits=32)
        errors.append({"kind": "projected vs measured", "candidate": m.candidate, "batch": m.batch,
                       "in_calibration": m.candidate == "reference",
                       "prefill_error": round(relative_error(p.prefill_ms_per_token, m.prefill_ms_per_token.median_ms), 4),
                       "decode_error": round(relative_error(p.decode_ms_per_token, m.decode_ms_per_token.median_ms), 4)})
    if target.name == here.name:  # the calibrated row replaces the table's placeholder
        target = replace(here, price_per_hour=target.price_per_hour)
    projected = [project(workload, target, b, prompt_tokens, decode_tokens) for b in batches]
    if target.name != here.name:
        projected += [project(workload, here, b, prompt_tokens, decode_tokens, kv_bits=32) for b in batches]
    cost = []
    for p in projected:
        hardware = target if p.target == target.name else here
        if hardware.price_per_hour is None:
            continue
        cost.append(cost_estimate(hardware.name, hardware.price_per_hour, p.prefill_tokens_per_s, p.decode_tokens_per_s,
                                  p.batch, "projected", utilisation))
    if target.price_per_hour is None:
        notes.append(f"{target.name} has no price per hour in the table: no cost shown")
    return PerfReport(candidate.name, workload, memory, memory.fits(target), tuple(measured), lowbit, tuple(projected),
                      here, bandwidth, overhead, tuple(errors), tuple(cost), tuple(notes))
