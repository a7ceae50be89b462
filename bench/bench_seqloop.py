"""The product's closed loop (`sensitivity/loop.plan_loop`) with every round applied and measured by gptq-seq.

  python bench/bench_mixed.py ... --out MIXED                       # writes MIXED/ratios.json (about an hour)
  python bench/bench_seqloop.py --ratios MIXED/ratios.json --size w3g64 [--slices en,fr,zh,code,arith]
                                [--settings ...] [--rounds 4] [--max-2bit-per-block 0] [--calibration MIX] --out OUT
  then: python bench/bench_peers.py --slices ... --windows 8 --plan OUT/plan-loop.yaml --out OUT

Why: at uniform W3 g64's bytes the planner on gptq-seq's own error predicted 0.53x uniform's worst slice and measured
0.75x (bench/results/mixed-log8-2026-12-07/). gptq-seq fits each layer on inputs that went through the quantized
layers before it, so part of an earlier module's error is absorbed later, and no sum of one-module scores carries
that; local steps scored at the plan were as wrong (docs/plan.md, 2026-12-03). What is left is to measure whole plans.
This is the Plan page's "Plan, run, refit" job as it runs for a calibrated method, on a store that holds:
1. the fast scan of `--settings` on `--slices` (the block linears); the loop plans only those (`exclude`: every other
   module), so the embedding and the tied head stay fp32, as on the uniform side, even where the store has their
   scores;
2. gptq-seq's per-slice output error over RTN's from bench_mixed's `ratios.json` (the same method, settings, slices
   and recipe; its table in float32), saved as the closed loop saves the ratios it measures, so the job plans on them
   (`method_ratios.stored_ratios`) instead of building the table again;
then `plan_loop(method="gptq-seq", measure_on="probe")` under the block linears' bits per weight of uniform `--size`:
uniform under the same budget first (the fit's first plan), then up to `--rounds` rounds of plan -> apply by gptq-seq
-> KL on each slice's calibration rows at the fast scan depth -> refit (slice factors, per-bit-width alphas), and the
kept plan run once at the fast protocol. The choice is made on calibration rows; bench_peers judges the kept plan on
eval rows. Writes OUT/seqloop.jsonl (each round's predicted and measured worst slice, seconds, load average; the
model; the notes) and OUT/plan-loop.yaml (the kept plan, with the recipe).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_mixed import add_planner_args, plan_with_recipe, read_ratios, run_recipe, start_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_planner_args(parser)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--store", default=None,
                        help="a shrink.db whose fast scan of this model to reuse (copied; never written)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    slices, settings = args.slices.split(","), args.settings.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from shrink_core.paths import model_cache_dir

    # a store of its own, the converted models shared (as bench_plan's loop part does)
    os.environ["SHRINK_MODEL_CACHE"] = str(model_cache_dir())
    home = out / "home"
    home.mkdir(exist_ok=True)
    os.environ["SHRINK_HOME"] = str(home)
    if args.store and not (home / "shrink.db").exists():
        shutil.copy(args.store, home / "shrink.db")


    import torch

    from shrink_core.model.describe import describe, device_label
    from shrink_core.plan import dump_plan, plan_from_dict
    from shrink_core.plan.planner import setting_bytes
    from shrink_core.results.method_ratios import save_ratios
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.loop import plan_loop
    from shrink_core.sensitivity.probe import SCAN_DEPTHS
    from shrink_core.sensitivity.scan import run_scan

    emit, loaded, rows, linears = start_run(out, "seqloop", args.model)
    method = "gptq-seq"
    recipe = run_recipe(args.calibration)
    ratios = read_ratios(args.ratios, linears, settings, slices)
    bits = float(setting_bytes(rows, linears, [args.size]).sum()) * 8 / sum(r.params for r in rows if r.name in linears)
    # the draft the planner's rules go in front of: every block linear at --size by gptq-seq, with the recipe
    draft = plan_with_recipe(dict.fromkeys(linears, args.size), rows, method, recipe, name=f"draft {args.size}")
    emit({"part": "setup", "model": args.model, "weights_hash": loaded.weights_hash, "method": method,
          "size": args.size, "bits_per_weight": bits, "slices": slices, "settings": settings,
          "calibration": recipe.to_dict(), "kept_fp32": "embedding and the tied head", "ratios": args.ratios,
          "torch_threads": torch.get_num_threads()})

    store = Store()
    store.save_model(describe(args.model))
    t0 = time.perf_counter()
    report = run_scan(loaded, slices, settings, "fast", "fast", store=store, embeddings=False)
    emit({"part": "scan", "seconds": round(time.perf_counter() - t0, 1), "computed": report.computed})
    save_ratios(store, args.model, loaded.weights_hash, device_label(loaded.model), SCAN_DEPTHS["fast"], method,
                recipe.to_dict(), {k: v for k, v in ratios.items() if k[1] in settings and k[2] in slices})

    t0 = time.perf_counter()
    result = plan_loop(store, args.model, slices, settings,
                       {"kind": "bits_per_weight", "value": bits, "low_per_block": args.max_2bit_per_block},
                       dump_plan(draft), method=method, rounds=args.rounds, time_budget_s=float("inf"),
                       exclude=[r.name for r in rows if r.name not in set(linears)],  # the embedding stays fp32
                       measure_on="probe", eval_budget="fast",
                       progress=lambda f, m="": emit({"part": "progress", "fraction": round(f, 3), "message": m,
                                                      "seconds": round(time.perf_counter() - t0, 1)}))
    for r in result["rounds"]:
        emit({"part": "round", **{k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items()}})
    kept = next(r for r in result["rounds"] if r["kind"] == "verified")
    plan = next(c["plan"] for c in store.candidates() if c["id"] == kept["candidate_id"])
    # the store keeps a candidate's plan with sorted keys, the mix's included, and the rows a recipe draws depend on
    # its mix's order (docs/plan.md, 2026-12-07): the recipe as the loop applied it, the draft's
    (out / "plan-loop.yaml").write_text(dump_plan(plan_from_dict({**plan, "calibration": recipe.to_dict()})))
    emit({"part": "result", "seconds": result["seconds"], "loop_seconds": result["loop_seconds"],
          "model": result["model"], "notes": result["notes"], "kept": kept["of"], "plan": str(out / "plan-loop.yaml")})


if __name__ == "__main__":
    main()
