"""Sensitivity benchmark on the built-in model: fast scan time, fast-vs-exhaustive Spearman, prefix-reuse speedup.

    .venv/bin/python bench/bench_sensitivity.py [--slices en,fr,zh] [--check 32] [--parts prefix,fast,agreement]

Prints one JSON line per finished part (so a slow machine still leaves figures), then one summary line. Every run
uses a throw-away store, so nothing is reused from earlier runs. Load averages are printed with the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETTINGS = ["w8", "w4g64", "w3g64", "w2g64"]


def emit(part: str, **figures) -> dict:
    line = {"bench": "sensitivity", "part": part, "utc": time.strftime("%H:%M:%S", time.gmtime()),
            "load_avg": [round(x, 2) for x in os.getloadavg()], **figures}
    print(json.dumps(line), flush=True)
    return line


def prefix_part(loaded, slice_id: str, count: int) -> dict:
    import torch

    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.sensitivity import SCAN_DEPTHS, ProbeCache, get_setting, probe, sample_modules
    from shrink_core.sensitivity.probe import eval_tokens

    budget = SCAN_DEPTHS["fast"]
    rows = block_linears(inventory(loaded.model))
    named = dict(loaded.model.named_modules())
    cache = ProbeCache(loaded.model, eval_tokens(loaded.tokenizer, slice_id, budget.sequences, budget.seq_len),
                       budget.chunk)
    blocks = {r.name: r.block for r in rows}
    reuse = full = reuse_cpu = full_cpu = 0.0
    identical = True
    setting = get_setting("w3g64")
    for r in sample_modules(rows, count):
        module = {r.name: named[r.name]}
        t0 = time.process_time()
        a = probe(cache, module, blocks, setting, reuse_prefix=True)
        t1 = time.process_time()
        b = probe(cache, module, blocks, setting, reuse_prefix=False)
        t2 = time.process_time()
        reuse, full = reuse + a.seconds, full + b.seconds
        reuse_cpu, full_cpu = reuse_cpu + t1 - t0, full_cpu + t2 - t1
        identical = identical and a.kl == b.kl and a.delta_nll == b.delta_nll
    return emit("prefix", slice=slice_id, probes=count, tokens=cache.tokens, threads=torch.get_num_threads(),
                cache_seconds=round(cache.seconds, 2), reuse_s_per_probe=round(reuse / count, 3),
                full_s_per_probe=round(full / count, 3), speedup=round(full / reuse, 2), identical=identical,
                reuse_cpu_s_per_probe=round(reuse_cpu / count, 3), full_cpu_s_per_probe=round(full_cpu / count, 3),
                cpu_speedup=round(full_cpu / reuse_cpu, 2),
                naive_sweep_hours_extrapolated=round(210 * 4 * 3 * full / count / 3600, 2),
                prefix_sweep_hours_extrapolated=round(210 * 4 * 3 * reuse / count / 3600, 2))


def _top5(report) -> dict:
    """The five most sensitive modules per slice under W3 g64 (fast KL)."""
    out = {}
    for slice_id in dict.fromkeys(r.slice for r in report.records):
        rows = sorted((r for r in report.records if r.slice == slice_id and r.setting == "w3g64"), key=lambda r: -r.value)
        out[slice_id] = [r.module.replace("model.layers.", "") for r in rows[:5]]
    return out


def _sums(records, setting: str) -> dict:
    """Per slice, the fast KL summed over the block linears (the planner's additive prediction of the setting made
    uniform; docs/methods.md has each measured whole)."""
    out: dict[str, float] = {}
    for r in records:
        if r.setting == setting and r.metric == "kl" and r.method == "fast":  # the embedding is probed
            out[r.slice] = out.get(r.slice, 0.0) + r.value
    return {k: round(v, 3) for k, v in out.items()}


def slices_part(records, k: int = 10) -> dict:
    """Is the most sensitive set the same across slices? Fast W3 g64 KL over all 210 modules."""
    from shrink_core.sensitivity import compare_slices, top_modules

    short = lambda name: name.replace("model.layers.", "")  # noqa: E731
    slices = list(dict.fromkeys(r.slice for r in records))
    return emit("slices", setting="w3g64", k=k,
                top={s: [short(m) for m in top_modules(records, s, "w3g64", "kl", k)] for s in slices},
                pairs={f"{c.slice_a}/{c.slice_b}": {"spearman": round(c.spearman, 3), "shared_top": c.shared_top}
                       for c in compare_slices(records, "w3g64", "kl", k)})


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", default="en,fr,zh")
    parser.add_argument("--check", type=int, default=32)
    parser.add_argument("--prefix-probes", type=int, default=8)
    parser.add_argument("--parts", default="prefix,fast,agreement")
    parser.add_argument("--budget", default="fast", help="scan budget of the fast scan and the agreement check")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ["SHRINK_HOME"] = os.environ.get("BENCH_HOME") or tempfile.mkdtemp(prefix="bench-sens-")  # reuse probes
    os.environ.setdefault("SHRINK_MODEL_CACHE", str(Path.home() / ".cache" / "shrink" / "models"))
    from shrink_core.model.load import load
    from shrink_core.results.store import Store
    from shrink_core.sensitivity import run_scan

    slices = args.slices.split(",")
    parts = args.parts.split(",")
    loaded = load("builtin:smollm2-135m")
    store = Store()
    summary = {}
    if "prefix" in parts:
        summary["prefix"] = prefix_part(loaded, slices[0], args.prefix_probes)
    if "fast" in parts:
        started, cpu = time.perf_counter(), time.process_time()
        report = run_scan(loaded, slices, SETTINGS, "fast", args.budget, metrics=("kl",), store=store)
        summary["fast"] = emit("fast", slices=slices, settings=SETTINGS, records=len(report.records),
                               seconds=round(time.perf_counter() - started, 2),
                               cpu_seconds=round(time.process_time() - cpu, 2), threads=_threads(),
                               timings={k: round(v, 2) for k, v in report.timings.items()},
                               w3g64_sums=_sums(report.records, "w3g64"))
        summary["slices"] = slices_part(report.records)
    if "agreement" in parts:
        for slice_id in slices:  # one line per slice, so a slow machine still leaves figures
            started = time.perf_counter()
            report = run_scan(loaded, [slice_id], ["w3g64"], "fast", args.budget, metrics=("kl",), check=args.check,
                              store=store)
            summary[f"agreement_{slice_id}"] = emit(
                "agreement", slice=slice_id, seconds=round(time.perf_counter() - started, 2),
                probes=report.timings.get("probes"),
                probe_s=round(report.timings.get("probes_s", 0) / max(report.timings.get("probes", 1), 1), 3),
                spearman={f"{a.slice}/{a.setting}/{a.metric}": round(a.spearman, 3) for a in report.agreement},
                modules=args.check, budget=args.budget, top5=_top5(report))
    emit("summary", **{k: {kk: vv for kk, vv in v.items() if kk not in ("bench", "part")} for k, v in summary.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
