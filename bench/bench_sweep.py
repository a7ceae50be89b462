"""The sweep on each executor: 8 RTN plans x 2 slices on the built-in model, local against Ray with 1 and 2 workers,
plus Ray's own cost (start-up, and the overhead per task from empty units). Prints one JSON line per figure.

  flock /tmp/cpu.lock .venv/bin/python bench/bench_sweep.py [--plans 8] [--slices en,fr] [--skip-local]

Every run uses a fresh store, so the 2 reference units run each time (26 units: 2 references, 8 applies, 16
evaluations). Figures of every run are compared with the first run's: they must be identical.
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

from shrink_core.results.store import Store  # noqa: E402
from shrink_core.runtime.executors import ExecutorConfig, Unit, run_units, session  # noqa: E402
from shrink_core.runtime.sweep import run_sweep  # noqa: E402

SETTINGS = [(8, 128), (4, 128), (4, 64), (4, 32), (3, 128), (3, 64), (3, 32), (2, 32)]


def rtn_plan(bits: int, group: int) -> str:
    return (f"version: 1\nname: rtn-w{bits}g{group}\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
            f"    weights: {{bits: {bits}, group_size: {group}, method: rtn}}\n")


def emit(**figures) -> None:
    print(json.dumps({**figures, "loadavg": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def sweep_run(name: str, config: ExecutorConfig, model: str, plans: list[str], slices: list[str]) -> dict:
    store = Store(Path(tempfile.mkdtemp(prefix="bench-sweep-")) / "shrink.db")
    started = time.perf_counter()
    report = run_sweep(model, plans, slices, "fast", config, store=store)
    wall = time.perf_counter() - started
    emit(bench="sweep", run=name, wall_s=round(wall, 1), units=report["units"], workers=len(report["workers"]),
         **unit_seconds(store), model=model, plans=len(plans), slices=slices)
    return {"wall": wall, "results": report["results"]}


def unit_seconds(store: Store) -> dict:
    """Seconds inside the units (as the workers timed them), in all and per kind: what a cluster model scales."""
    kinds = {"reference": [], "apply": [], "eval": []}
    for row in store.results():
        executed = row["payload"].get("executed")
        if executed:
            kind = "apply" if row["kind"] == "size" else "reference" if row["plan"] is None else "eval"
            kinds[kind].append(executed["seconds"])
    busy = sum(sum(v) for v in kinds.values())
    tokens = [r["payload"]["tokens"] for r in store.results("eval") if r["plan"] is not None]
    return {"busy_s": round(busy, 1), **{f"{k}_unit_s": round(sum(v) / len(v), 2) for k, v in kinds.items() if v},
            "eval_unit_tokens": round(sum(tokens) / len(tokens)) if tokens else None}


def overhead(cpus: int, tasks: int = 200) -> None:
    """Ray's fixed costs: start-up to the first finished task, and the wall per empty task once warm."""
    config = ExecutorConfig(kind="ray", local_cpus=cpus)
    started = time.perf_counter()
    with session(config):
        run_units([Unit("first", "shrink_core.runtime.diagnostics:sleep_unit", {"seconds": 0, "value": 0})], config,
                  lambda u, o: None, lambda f, m="": None)
        first = time.perf_counter() - started
        units = [Unit(f"empty {i}", "shrink_core.runtime.diagnostics:sleep_unit", {"seconds": 0, "value": i})
                 for i in range(tasks)]
        warm = time.perf_counter()
        run_units(units, config, lambda u, o: None, lambda f, m="": None)
        per_task = (time.perf_counter() - warm) / tasks
    emit(bench="ray_overhead", cpus=cpus, startup_to_first_task_s=round(first, 2), per_task_ms=round(per_task * 1e3, 2),
         tasks=tasks)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--plans", type=int, default=8)
    parser.add_argument("--slices", default="en,fr")
    parser.add_argument("--skip-local", action="store_true")
    args = parser.parse_args()
    plans = [rtn_plan(b, g) for b, g in SETTINGS[: args.plans]]
    slices = args.slices.split(",")
    overhead(2)
    runs = {}
    if not args.skip_local:
        runs["local"] = sweep_run("local", ExecutorConfig(), args.model, plans, slices)
    for workers in (1, 2):
        runs[f"ray-{workers}"] = sweep_run(f"ray-{workers}", ExecutorConfig(kind="ray", local_cpus=workers),
                                           args.model, plans, slices)
    first = next(iter(runs.values()))["results"]
    emit(bench="sweep_summary", identical_figures=all(r["results"] == first for r in runs.values()),
         speedup_2_vs_1_ray_worker=round(runs["ray-1"]["wall"] / runs["ray-2"]["wall"], 2),
         **({"speedup_ray2_vs_local": round(runs["local"]["wall"] / runs["ray-2"]["wall"], 2)} if "local" in runs
            else {}))


if __name__ == "__main__":
    main()
