"""Planner benchmark on a real model: prints JSON lines of figures.

  python bench/bench_plan.py [--model builtin:smollm2-135m] [--parts timing,quality] [--methods rtn,gptq]
                             [--sizes w4g128,w3g64] [--rows 40]

timing: the exact planner (HiGHS MILP) on 210 modules x 6 settings (+ keep), worst of 4 slices, with seeded synthetic
  scores (the scan does not score every setting), at two budgets; its proven gap, and the greedy heuristic's objective.
quality: fast-scan scores (`run_scan`, its fast budget) -> the planner's mixed-precision plan (objective: worst slice)
  at no more packed bytes than uniform W4 g128 / W3 g64, applied with the same method as the uniform plan; both are
  MEASURED per slice on the first --rows text rows of each slice (window 512), with bootstrap 95% intervals: ppl per
  plan, and the paired per-token NLL difference planner - uniform (negative = planner better).
  The scan also probes the (tied) embedding exhaustively, so the planner chooses its precision like any module's.
loop: the Plan page's closed loop as a user runs it on a fresh store (fast scan, then fitted rounds and local steps,
  each plan run for real at the fast protocol), timed: `--parts loop --loop-bits 3.5`.
embedding: the same budgets with the (tied) embedding pinned to int8 per channel (RTN) by hand and the planner filling
  the block linears with the bytes that frees; the fp32 embedding is 113 MB of SmolLM2's ~160 MB at these sizes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from shrink_core.evaluation.evaluate import PROTOCOLS, evaluate  # noqa: E402
from shrink_core.evaluation.slices import get_slice  # noqa: E402
from shrink_core.evaluation.stats import bootstrap_ratio_ci  # noqa: E402
from shrink_core.model.inventory import block_linears, inventory  # noqa: E402
from shrink_core.plan import load_plan, resolve  # noqa: E402
from shrink_core.plan.planner import SETTINGS, build_problem, greedy, solution_plan, solve  # noqa: E402

LINEARS = "[q, k, v, o, gate, up, down]"


def emit(figures: dict) -> None:
    print(json.dumps({**figures, "load_average": [round(x, 2) for x in os.getloadavg()]}), flush=True)


def uniform_text(setting: str, method: str) -> str:
    spec = SETTINGS[setting]
    group = "channel" if spec["group_size"] is None else spec["group_size"]
    return (f"version: 1\nname: uniform {setting} {method}\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: "
            f"{spec['bits']}, group_size: {group}, symmetric: {str(spec['symmetric']).lower()}, method: {method}}}}}\n")


def synthetic_scores(rows, slices, settings, seed: int = 0) -> dict:
    """Module x slice sensitivity (log-normal) times the setting's relative rounding error (~4^-bits, finer groups
    help): the shape real scans have, for timing only."""
    rng = np.random.default_rng(seed)
    error = {s: 4.0 ** -SETTINGS[s]["bits"] * (1 + 16 / (SETTINGS[s]["group_size"] or 4096)) for s in settings}
    scores = {}
    for row in rows:
        base = rng.lognormal(0, 1.5)
        for slice_id in slices:
            weight = base * rng.lognormal(0, 0.5)
            scores.update({(row.name, s, slice_id): weight * error[s] for s in settings})
    return scores


def objective_of(problem, choice: dict) -> float:
    picks = [problem.settings.index(choice[m]) for m in problem.modules]
    return float(problem.loss[:, np.arange(len(picks)), picks].sum(axis=1).max())


def timing(loaded, slices) -> None:
    rows = block_linears(inventory(loaded.model))
    settings = list(SETTINGS)
    problem = build_problem(rows, synthetic_scores(rows, slices, settings), slices, settings)
    for size in ("w4g128", "w3g64"):
        budget = sum(r.packed_bytes for r in resolve(rows, load_plan(uniform_text(size, "rtn"))))
        solution = solve(problem, budget_bytes=budget, objective="worst")
        heuristic = objective_of(problem, greedy(problem, budget))
        emit({"part": "timing", "modules": len(problem.modules), "settings": len(settings), "options": problem.settings,
              "slices": len(slices), "budget": f"bytes of uniform {size}", "scores": "synthetic (seeded)",
              "solver": solution.solver, "seconds": round(solution.seconds, 3), "status": solution.status,
              "proven_gap": solution.gap, "objective": solution.objective, "greedy_objective": heuristic,
              "greedy_worse_by": round(heuristic / solution.objective - 1, 4)})


def measured(model, tokenizer, slices, budget) -> dict:
    return {r.slice: r for r in evaluate(model, tokenizer, [get_slice(s) for s in slices], budget)}


def paired_delta(a, b) -> dict:
    """Token-weighted mean NLL difference b - a over the same items, with its bootstrap interval."""
    if a.per_item["ids"] != b.per_item["ids"]:
        raise ValueError(f"{a.slice}: the two plans were scored on different items")
    tokens = np.array(a.per_item["tokens"], dtype=float)
    diff = np.array(b.per_item["nll"]) - np.array(a.per_item["nll"])  # per item, summed over its tokens
    low, high = bootstrap_ratio_ci(diff, tokens)
    return {"delta_nll": round(float(diff.sum() / tokens.sum()), 5), "ci95": [round(low, 5), round(high, 5)]}


def slice_figures(results: dict) -> dict:
    return {s: {"ppl": round(r.ppl, 3), "ppl_ci95": [round(x, 3) for x in r.ppl_ci], "nll": round(r.nll, 5)}
            for s, r in results.items()}


def scan_problem(loaded, args, slices, pinned: dict | None = None):
    """Fast-scan scores (reused from the store unless --fresh-scan) -> the planner's problem over the block linears."""
    from shrink_core.plan.predict import score_table
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.scan import run_scan

    settings = args.settings.split(",")
    with tempfile.TemporaryDirectory() as home:
        store = Store(Path(home) / "shrink.db") if args.fresh_scan else Store()
        report = run_scan(loaded, slices, settings, "fast", args.scan_budget, store=store)
    emit({"part": "scan", "method": "fast", "budget": args.scan_budget, "settings": settings, "slices": slices,
          "computed": report.computed, "reused": report.reused, "seconds": report.seconds, "metric": args.metric,
          "timings": {k: round(v, 2) for k, v in report.timings.items()},
          "embedding_scores": {f"{r.module} {r.setting} {r.slice}": round(r.value, 5) for r in report.records
                               if r.kind in ("embedding", "lm_head") and r.metric == args.metric}})
    return build_problem(inventory(loaded.model), score_table(report.records, args.metric), slices, settings,
                         pinned=pinned)


def quality(loaded, args, slices) -> None:
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
    from shrink_core.plan.presets import DEFAULT_RECIPE

    problem = scan_problem(loaded, args, slices)
    linear_names = {r.name for r in block_linears(inventory(loaded.model))}
    budget = replace(PROTOCOLS["fast"], name=f"bench-{args.rows}", text_rows=args.rows)
    recipe = {**DEFAULT_RECIPE, "n_sequences": args.calib_n}
    calibration = calibration_tokens(loaded.tokenizer, CalibrationRecipe.from_dict(recipe))
    eval_label = f"first {args.rows} text rows per slice, window 512 (fast budget otherwise), measured on CPU"
    reference = measured(loaded.model, loaded.tokenizer, slices, budget)
    emit({"part": "reference", "eval": eval_label, "reference": slice_figures(reference)})
    for size in args.sizes.split(","):
        uniform_rows = resolve(loaded.model, load_plan(uniform_text(size, "rtn")))  # same bytes for every method
        planned_bytes = sum(r.packed_bytes for r in uniform_rows if r.name in problem.modules)
        solution = solve(problem, budget_bytes=planned_bytes, objective="worst")
        counts = {s: list(solution.choice.values()).count(s) for s in problem.settings}
        embedding_choice = {m: solution.choice[m] for m in problem.modules if m not in linear_names}
        for method in args.methods.split(","):
            plans = {"uniform": load_plan(uniform_text(size, method)),
                     "planner": solution_plan(solution.choice, inventory(loaded.model), method=method)}
            results, sizes, seconds = {}, {}, {}
            for label, plan in plans.items():
                model = copy.deepcopy(loaded.model)
                applied = apply_plan_(model, plan, calibration if method == "gptq" else None)
                sizes[label] = applied.totals["total_packed_bytes"]
                started = time.perf_counter()
                results[label] = measured(model, loaded.tokenizer, slices, budget)
                seconds[label] = {"apply_s": round(applied.timings["total_s"], 1),
                                  "eval_s": round(time.perf_counter() - started, 1)}
                del model
            assert sizes["planner"] <= sizes["uniform"], "the planner's plan must not be larger"
            deltas = {s: paired_delta(results["uniform"][s], results["planner"][s]) for s in slices}
            worst = {}
            for label, result in results.items():  # the worst slice: largest NLL increase over the reference
                increase = {s: result[s].nll - reference[s].nll for s in slices}
                slice_id = max(increase, key=increase.get)
                worst[label] = {"slice": slice_id, "delta_nll_vs_reference": round(increase[slice_id], 5)}
            emit({"part": "quality", "size_of": f"uniform {size}", "method": method,
                  "calibration": recipe if method == "gptq" else None, "eval": eval_label,
                  "packed_bytes": sizes, "planner": {"status": solution.status, "gap": solution.gap,
                                                     "seconds": round(solution.seconds, 3), "settings": counts,
                                                     "embedding": embedding_choice,
                                                     "predicted_" + args.metric: solution.predicted},
                  "uniform": slice_figures(results["uniform"]), "planned": slice_figures(results["planner"]),
                  "planner_minus_uniform": deltas, "worst_slice": worst,
                  "planner_better_on_worst": worst["planner"]["delta_nll_vs_reference"]
                  < worst["uniform"]["delta_nll_vs_reference"], "timings": seconds})


def embedding(loaded, args, slices) -> None:
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.sensitivity.scan import embedding_rows

    pinned = {r.name: "w8" for r in embedding_rows(inventory(loaded.model))}  # by hand: int8 per channel (RTN)
    problem = scan_problem(loaded, args, slices, pinned)
    budget = replace(PROTOCOLS["fast"], name=f"bench-{args.rows}", text_rows=args.rows)
    reference = measured(loaded.model, loaded.tokenizer, slices, budget)
    seen = {}  # the same plan at two budgets is measured once
    for size in args.sizes.split(","):
        uniform_bytes = sum(r.packed_bytes for r in resolve(loaded.model, load_plan(uniform_text(size, "rtn"))))
        fixed = sum(r.packed_bytes for r in resolve(loaded.model, load_plan(uniform_text(size, "rtn")))
                    if r.name not in problem.modules)  # the tied head: counted at the embedding
        solution = solve(problem, budget_bytes=uniform_bytes - fixed, objective="worst")
        plan = solution_plan(solution.choice, inventory(loaded.model), method="rtn")
        key = tuple(sorted(solution.choice.items()))
        if key not in seen:
            model = copy.deepcopy(loaded.model)
            applied = apply_plan_(model, plan)
            seen[key] = applied, measured(model, loaded.tokenizer, slices, budget)
            del model
        applied, results = seen[key]
        emit({"part": "embedding", "size_of": f"uniform {size}", "method": "rtn",
              "packed_bytes": {"uniform": uniform_bytes, "planner": applied.totals["packed_bytes"]},  # modules, no norms
              "settings": {s: list(solution.choice.values()).count(s) for s in problem.settings},
              "planned": slice_figures(results),
              "delta_nll_vs_reference": {s: round(results[s].nll - reference[s].nll, 5) for s in slices}})


def loop(loaded, args, slices) -> None:
    """The Plan page's "Plan, run, refit" as a user runs it, timed from a fresh store: the fast scan, then the job's
    function (`plan_loop`: fitted rounds, then local steps, measured on the calibration rows (`--measure-on probe`)
    with the kept plan run once at the fast protocol, or each run at the protocol and stored (`protocol`))."""
    import os

    from shrink_core.model.describe import describe
    from shrink_core.paths import model_cache_dir
    from shrink_core.plan import dump_plan, load_plan
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.loop import plan_loop
    from shrink_core.sensitivity.scan import run_scan

    settings = args.settings.split(",")
    # the converted model is shared, as for a user who loaded it on the Model page: the store alone starts empty
    os.environ["SHRINK_MODEL_CACHE"] = str(model_cache_dir())
    with tempfile.TemporaryDirectory() as home:
        os.environ["SHRINK_HOME"] = home
        store = Store()
        store.save_model(describe(args.model))
        started = time.perf_counter()
        report = run_scan(loaded, slices, settings, "fast", args.scan_budget, store=store)
        scan_s = time.perf_counter() - started
        started = time.perf_counter()
        result = plan_loop(store, args.model, slices, settings, {"kind": "bits_per_weight", "value": args.loop_bits},
                           dump_plan(load_plan(uniform_text("w8", "rtn"))), rounds=args.loop_rounds,
                           local_steps=args.local_steps, time_budget_s=args.loop_seconds, measure_on=args.measure_on)
        loop_s = time.perf_counter() - started
    emit({"part": "loop", "model": args.model, "slices": slices, "settings": settings,
          "budget": f"{args.loop_bits} bits per weight of the planned modules", "scan_seconds": round(scan_s, 1),
          "scan_computed": report.computed, "measure_on": args.measure_on, "job_seconds": round(loop_s, 1),
          "loop_seconds": result["loop_seconds"], "time_budget_s": args.loop_seconds,
          "rounds": [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()
                      if k not in ("candidate_id",)} for r in result["rounds"]]})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--parts", default="timing,quality")
    parser.add_argument("--slices", default="en,fr,zh,code")
    parser.add_argument("--settings", default="w8,w4g64,w3g64,w2g64", help="settings the planner may choose")
    parser.add_argument("--sizes", default="w4g128,w3g64", help="uniform plans whose packed size is the budget")
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument("--metric", default="kl", choices=["kl", "dnll"])
    parser.add_argument("--scan-budget", default="fast")
    parser.add_argument("--fresh-scan", action="store_true", help="scan into a throw-away store (no reuse)")
    parser.add_argument("--rows", type=int, default=40, help="text rows per slice in the measured evaluation")
    parser.add_argument("--calib-n", type=int, default=16, help="GPTQ calibration sequences of 512 tokens")
    parser.add_argument("--loop-bits", type=float, default=3.5, help="loop: bits per weight of the planned modules")
    parser.add_argument("--loop-rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--loop-seconds", type=float, default=240.0, help="loop: the job's time budget (the page's)")
    parser.add_argument("--measure-on", default="probe", choices=["probe", "protocol"],
                        help="loop: where rounds and steps are measured")
    args = parser.parse_args()
    from shrink_core.model.load import load

    loaded = load(args.model)
    slices = args.slices.split(",")
    parts = set(args.parts.split(","))
    if "timing" in parts:
        timing(loaded, slices)
    if "quality" in parts:
        quality(loaded, args, slices)
    if "embedding" in parts:
        embedding(loaded, args, slices)
    if "loop" in parts:
        loop(loaded, args, slices)


if __name__ == "__main__":
    main()
