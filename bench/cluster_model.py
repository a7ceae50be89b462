"""On paper: the wall time of an 8B model's full sensitivity scan and of a 50-candidate sweep on 8 and 64 GPUs, built
from measured per-unit costs. Prints one JSON line per figure (`--markdown` adds the table docs/cluster.md shows).

  .venv/bin/python bench/cluster_model.py [--markdown]

Measured inputs (read from the files, so the table moves when they are re-measured):
- the 8B shape's stages on a 2-core CPU (bench_scale.py: bench/results/scale-2026-11-30/scale-8b-*.jsonl): one
  forward of the probe set (probe cache, 8 x 128 tokens), an embedding probe, the Fisher pass of one slice, the
  reference evaluation of `en` (8,148 tokens, `fast`), RTN of all 224 linears;
- Ray's own costs on this machine (bench_sweep.py: bench/results/sweep-2026-12-01/sweep.jsonl): start-up to the
  first task, and the overhead per task.
Assumptions (stated, not measured here): ASSUMED below. The CPU's effective rate comes from the measured probe-cache
forward; each 8B unit's GPU time is its measured CPU time x (that rate / the GPU's assumed effective rate). Units
bound by something other than matrix FLOPs (RTN's elementwise work) are scaled the same way, which flatters them.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SCALE = ROOT / "results" / "scale-2026-11-30"
SWEEP = ROOT / "results" / "sweep-2026-12-01" / "sweep.jsonl"

ASSUMED = {
    "gpu": "H100 SXM",
    "gpu_peak_bf16_tflops": 989.0,  # dense bf16, vendor figure
    "gpu_mfu": 0.35,  # eager Hugging Face forward/backward at 1-8k tokens per batch
    "load_s_per_worker": 12.0,  # 16 GB from a node's NVMe (2 GB/s, page cache after the first) + CUDA start-up
    "task_overhead_s_cluster": 0.005,  # Ray's per-task cost over a network (measured locally: see the JSON)
    "ship_candidate_s": 3.0,  # a 16 GB candidate to another GPU: object store read, unpickle, host-to-device copy
    "slices": 10,  # en, fr, de, es, ru, zh, ja, ar, code, math
    "eval_tokens_per_slice": 8148,  # as en at the `fast` protocol (measured on the 8B shape); others assumed alike
    "scan_settings": 4,  # w8, w4g64, w3g64, w2g64
    "blocks": 32,
    "linears_per_block": 7,
    "probe_share_of_forward": 0.5,  # a probe at block b runs blocks b..L: half the model on average
    "candidates": 50,
}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def measured() -> dict:
    rows = [r for f in sorted(SCALE.glob("scale-8b-*.jsonl")) for r in _lines(f) if r.get("shape") == "8b"]
    stage = {r["stage"]: r for r in rows if "stage" in r and "stage_s" in r}
    scan = stage["scan"]["timings"]
    ray = next(r for r in _lines(SWEEP) if r.get("bench") == "ray_overhead")
    return {
        "params": stage["eval"]["params"],
        "cpu_threads": stage["eval"]["threads"],
        "probe_cache_s": scan["probe_cache_s"],  # one forward of 8 x 128 tokens
        "probe_tokens": 8 * 128,
        "embedding_probe_s": scan["probes_s"] / scan["probes"],  # a whole-model probe
        "fisher_s": scan["gradients_s"],  # one slice's Fisher pass (fast depth)
        "eval_reference_s": stage["eval"]["stage_s"],  # one forward of en's 8,148 tokens with the scoring
        "eval_tokens": stage["eval"]["tokens"],
        "rtn_s": stage["rtn"]["stage_s"],
        "ray_startup_s": ray["startup_to_first_task_s"],
        "ray_task_overhead_s_local": ray["per_task_ms"] / 1e3,
    }


def unit_costs(m: dict, a: dict) -> dict:
    """Seconds of each 8B unit on one GPU, from its measured CPU seconds."""
    cpu_rate = 2 * m["params"] * m["probe_tokens"] / m["probe_cache_s"]  # FLOP/s of the measured CPU forward
    gpu_rate = a["gpu_peak_bf16_tflops"] * 1e12 * a["gpu_mfu"]
    scale = cpu_rate / gpu_rate
    tokens = a["eval_tokens_per_slice"] / m["eval_tokens"]
    probe = m["embedding_probe_s"] * a["probe_share_of_forward"]
    block_unit = (m["probe_cache_s"] + a["linears_per_block"] * a["scan_settings"] * probe) * scale
    return {
        "cpu_effective_tflops": cpu_rate / 1e12, "gpu_effective_tflops": gpu_rate / 1e12, "cpu_to_gpu": 1 / scale,
        "reference_s": m["eval_reference_s"] * tokens * scale,
        "eval_s": 2 * m["eval_reference_s"] * tokens * scale,  # candidate and reference forwards, then KL
        "apply_rtn_s": m["rtn_s"] * scale,
        "fisher_s": m["fisher_s"] * scale,
        "probe_block_unit_s": block_unit,  # a block's linears x settings on one slice, its probe cache included
        "embedding_unit_s": (m["probe_cache_s"] + a["scan_settings"] * m["embedding_probe_s"]) * scale,
    }


def makespan(durations: list[float], workers: int) -> float:
    """Wall seconds of independent units on `workers` (longest first, each to the least busy worker), as a
    scheduler that starts a unit whenever a worker frees does."""
    loads = [0.0] * workers
    for d in sorted(durations, reverse=True):
        loads[loads.index(min(loads))] += d
    return max(loads)


def wall(m: dict, a: dict, c: dict, gpus: int) -> dict:
    """Wall seconds on `gpus` GPUs (one unit per GPU at a time); dependent stages run one after another."""
    fixed = m["ray_startup_s"] + a["load_s_per_worker"]  # connect; every worker loads the model once, in parallel
    task = a["task_overhead_s_cluster"]
    s, n = a["slices"], a["candidates"]
    # the fast method: a Fisher unit and an embedding unit per slice, all independent
    fast_scan = fixed + makespan([c["fisher_s"] + task] * s + [c["embedding_unit_s"] + task] * s, gpus)
    full_units = s * a["blocks"]
    full_scan = fixed + makespan([c["probe_block_unit_s"] + task] * full_units
                                 + [c["embedding_unit_s"] + task] * s, gpus)
    references = makespan([c["reference_s"] + task] * s, gpus)  # every evaluation needs its slice's reference
    by_plan = fixed + references + makespan([c["apply_rtn_s"] + s * c["eval_s"] + task] * n, gpus)
    # plan x slice units: the applies, then each evaluation reading its 16 GB candidate from another GPU
    by_slice = fixed + references + makespan([c["apply_rtn_s"] + task] * n, gpus) \
        + makespan([c["eval_s"] + a["ship_candidate_s"] + task] * (n * s), gpus)
    return {"gpus": gpus, "fast_scan_s": fast_scan, "full_scan_s": full_scan, "full_scan_units": full_units + s,
            "sweep_by_plan_s": by_plan, "sweep_by_slice_s": by_slice, "sweep_units_by_plan": n + s,
            "sweep_units_by_slice": n + n * s + s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    m, a = measured(), ASSUMED
    c = unit_costs(m, a)
    print(json.dumps({"measured": m}))
    print(json.dumps({"assumed": a}))
    print(json.dumps({"unit_costs_gpu_s": {k: round(v, 3) for k, v in c.items()}}))
    rows = [wall(m, a, c, gpus) for gpus in (1, 8, 64)]
    for row in rows:
        print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}))
    if args.markdown:
        print("\n| GPUs | fast scan, 10 slices | full exhaustive scan (units) | 50-candidate sweep, one unit per plan | "
              "the same, plan x slice units |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['gpus']} | {r['fast_scan_s']:.0f} s | {r['full_scan_s'] / 60:.1f} min ({r['full_scan_units']}) "
                  f"| {r['sweep_by_plan_s'] / 60:.1f} min | {r['sweep_by_slice_s'] / 60:.1f} min |")


if __name__ == "__main__":
    main()
