"""Mixed precision at a uniform setting's bytes, planned on a calibrated method's own error, for bench_peers' table.

  python bench/bench_mixed.py [--model builtin:smollm2-135m] [--method gptq-seq] [--sizes w3g64,w4g64]
                              [--slices en,fr,de,es,ru,zh,ja,ar,hi]
                              [--settings w8,w6g64,w4g64,w4g128,w3g64,w3g128,w2g64] [--out DIR]
  then: python bench/bench_peers.py --methods gptq-seq-w3g64 --plan DIR/plan-w3g64.yaml --out DIR

The planner's question for issue 17's 3-bit mark: at the bytes of uniform `--sizes` over the block linears (the
embedding and the tied head kept fp32 on both sides, as bench_peers keeps them), can a per-module choice of settings
lower the worst language? The steps are the product's own (the closed loop's `method_scores`, docs/plan.md):
1. the fast scan (RTN scores per module, setting and slice, on each slice's calibration rows; never eval rows);
2. the method applied uniformly at each setting (its whole-model path, the w4g64 preset's recipe), kept per module;
3. per slice, the method's output error over RTN's, tr(dW H dW^T), with H from that slice's calibration rows;
4. the planner (worst slice) on the scan's scores scaled by those ratios, under each uniform setting's exact bytes.
With --check-top K (off by default), before step 4 the K modules with the largest fast W3 g64 score on each slice are
probed alone (RTN W3 g64, whole model, on that slice's calibration rows) and each of their scores on that slice is
scaled by probed over fast: the fast scan's local quadratic can overshoot a saturating KL a hundredfold on one
fragile calibration sequence (ru, block 0's v_proj: 7.39 fast against 0.057 probed; docs/sensitivity.md), and the
planner would spend its bytes on those modules. It corrects only the K modules; the scan itself now caps each
calibration sequence's estimate at 10 times their median (`fisher.winsorized_sum`), which corrects the whole slice;
the 2026-12-03 run did the same here (--robust 10, one sequence per call, before the scan had it).
--ratios FILE reuses the ratios a run wrote (ratios.json; a run with the same mix): steps 2-3 take about half an hour.
--calibration MIX changes the method's mix (rows, length and shrink stay the preset's) for the table and the plans.
Writes DIR/plan-SIZE.yaml per size (the plan, with the calibration recipe), DIR/uniform-SIZE.yaml (every block
linear at SIZE with the same recipe: measure it with `bench_peers.py --plan` where the mix is not the preset's) and
DIR/mixed.jsonl (each step's seconds, the median ratios, the predicted worst slice of each plan and of uniform on the
same scores, the settings chosen). Steps 1-3 are shared by the sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_peers import emit as emit_line  # noqa: E402

LANGUAGES = "en,fr,de,es,ru,zh,ja,ar,hi"
SETTINGS = "w8,w6g64,w4g64,w4g128,w3g64,w3g128,w2g64"


def uniform_prediction(scores: dict, modules: list[str], setting: str, slices: list[str]) -> dict[str, float]:
    """The additive prediction of every module at one setting, per slice (the planner's own arithmetic)."""
    return {s: round(sum(scores[(m, setting, s)] for m in modules), 5) for s in slices}


def add_planner_args(parser, slices: str = "en,fr,zh,code,arith") -> None:
    """The arguments of the benches that plan on a bench_mixed ratios.json (bench_seqloop, bench_slicefix)."""
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--ratios", required=True, help="bench_mixed's ratios.json (same settings, slices and mix)")
    parser.add_argument("--size", default="w3g64", help="the uniform setting whose block-linear bytes are the budget")
    parser.add_argument("--slices", default=slices)
    parser.add_argument("--settings", default=SETTINGS, help="the planner's menu")
    parser.add_argument("--max-2bit-per-block", type=int, default=None)
    parser.add_argument("--calibration", default=None, help="gptq-seq's mix, as bench_mixed's --calibration")


def read_ratios(path: str, modules: list[str], settings: list[str], slices: list[str]) -> dict:
    """bench_mixed's ratios.json as (module, setting, slice) -> ratio, for these only; it must cover them all."""
    ratios = {(m, o, s): r for m, o, s, r in json.loads(Path(path).read_text())}
    wanted = {(m, o, s) for m in modules for o in settings for s in slices}
    if not wanted <= set(ratios):
        raise SystemExit(f"{path} does not cover these modules, settings and slices; run bench_mixed with them.")
    return {k: ratios[k] for k in wanted}


def run_recipe(mix: str | None = None, n_sequences: int | None = None):
    """The w4g64 preset's recipe with --calibration's mix (its rows, seq_len and shrink kept) and --calib-sequences."""
    from shrink_core.evaluation.calibration import CalibrationRecipe
    from shrink_core.plan.presets import QUANT_RECIPE

    recipe = CalibrationRecipe.from_dict(QUANT_RECIPE)
    if n_sequences:
        recipe = replace(recipe, n_sequences=n_sequences)
    if mix:
        recipe = replace(recipe, mix=CalibrationRecipe.parse(mix).mix)
    return recipe


def start_run(out: Path, name: str, model: str):
    """The planner benches' shared start: the emitter of <out>/<name>.jsonl (one JSON line with the load average,
    printed and written), the loaded model, its inventory and its block linears' names."""
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load

    emit = partial(emit_line, handle=(out / f"{name}.jsonl").open("w"))  # flushed every line, open for the run
    loaded = load(model)
    rows = inventory(loaded.model)
    return emit, loaded, rows, [r.name for r in block_linears(rows)]


def plan_with_recipe(choice: dict[str, str], rows, method: str, recipe, name: str = "planner",
                     description: str | None = None):
    """The choice as the planner's readable rules for `method`, calibrated with `recipe` (every plan here is)."""
    from shrink_core.plan import plan_from_dict, plan_to_dict
    from shrink_core.plan.planner import solution_plan

    data = plan_to_dict(solution_plan(choice, rows, method, name=name))
    if description:  # a uniform plan: its rules' 'planner: SETTING' notes would say the planner chose them
        data["description"] = description
        data["rules"] = [{k: v for k, v in rule.items() if k != "note"} for rule in data["rules"]]
    return plan_from_dict({**data, "calibration": recipe.to_dict()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--method", default="gptq-seq", choices=["gptq", "gptq-seq"])
    parser.add_argument("--sizes", default="w3g64,w4g64",
                        help="uniform settings whose block-linear bytes are the budgets, one plan each")
    parser.add_argument("--slices", default=LANGUAGES)
    parser.add_argument("--settings", default=SETTINGS, help="the planner's menu (the method is applied at each)")
    parser.add_argument("--max-2bit-per-block", type=int, default=None)
    parser.add_argument("--calib-sequences", type=int, default=None,
                        help="the method's calibration windows (default: the w4g64 preset's; fewer for a smoke run)")
    parser.add_argument("--calibration", default=None,
                        help="the method's calibration mix, e.g. en=0.3,fr=0.1,...,zh=0.2 (default: the w4g64 "
                             "preset's); the plans and the uniform plans written both carry it")
    parser.add_argument("--check-top", type=int, default=0, help="modules per slice probed to correct the fast scores")
    parser.add_argument("--ratios", default=None, help="ratios.json of an earlier run (same model, method, settings)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    slices, settings, sizes = args.slices.split(","), args.settings.split(","), args.sizes.split(",")
    if set(sizes) - set(settings):
        raise SystemExit(f"--sizes {sorted(set(sizes) - set(settings))[0]} must be one of --settings ({args.settings}).")
    if args.check_top and "w3g64" not in settings:
        raise SystemExit("--check-top probes at w3g64; add w3g64 to --settings or leave --check-top off.")

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import calibration_tokens
    from shrink_core.model.inventory import block_linears
    from shrink_core.plan import dump_plan
    from shrink_core.plan.planner import build_problem, setting_bytes, solve
    from shrink_core.plan.predict import scaled_scores, score_table
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.local import OptionWeights, method_option_weights
    from shrink_core.sensitivity.method_error import slice_ratios
    from shrink_core.sensitivity.probe import SCAN_DEPTHS, calib_tokens
    from shrink_core.sensitivity.scan import run_scan

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit, loaded, rows, linears = start_run(out, "mixed", args.model)
    recipe = run_recipe(args.calibration, args.calib_sequences)

    recipe_plan = partial(plan_with_recipe, rows=rows, method=args.method, recipe=recipe)
    emit({"part": "setup", "model": args.model, "weights_hash": loaded.weights_hash, "method": args.method,
          "sizes": sizes, "slices": slices, "settings": settings, "calibration": recipe.to_dict(),
          "kept_fp32": "embedding and the tied head", "torch_threads": torch.get_num_threads()})

    t0 = time.perf_counter()
    report = run_scan(loaded, slices, settings, "fast", "fast", store=Store(), embeddings=False)
    scores = {k: v for k, v in score_table(report.records, "kl").items() if k[0] in set(linears)}
    emit({"part": "scan", "seconds": round(time.perf_counter() - t0, 1), "records": len(report.records),
          "capped_sequences": report.timings.get("capped_sequences"),
          "sums_w3g64": {s: round(sum(scores[(m, "w3g64", s)] for m in linears), 4) for s in slices}
          if "w3g64" in settings else None})

    if args.check_top:
        from shrink_core.sensitivity.probe import ProbeCache, probe
        from shrink_core.sensitivity.settings import get_setting

        t0 = time.perf_counter()
        depth = SCAN_DEPTHS["fast"]
        blocks = {r.name: r.block for r in rows}
        corrections = {}
        for s in slices:
            cache = ProbeCache(loaded.model, calib_tokens(loaded.tokenizer, s, depth.calib_sequences,
                                                          depth.calib_len), chunk=depth.chunk)
            top = sorted(linears, key=lambda m: -scores[(m, "w3g64", s)])[:args.check_top]
            for m in top:
                probed = probe(cache, {m: loaded.model.get_submodule(m)}, blocks, get_setting("w3g64")).kl
                factor = probed / scores[(m, "w3g64", s)]
                corrections[(m, s)] = factor
                for o in settings:
                    scores[(m, o, s)] *= factor
            del cache
        worst = sorted(corrections.items(), key=lambda kv: kv[1])[:6]
        emit({"part": "check-top", "seconds": round(time.perf_counter() - t0, 1), "probed": len(corrections),
              "median_factor": round(float(np.median(list(corrections.values()))), 4),
              "smallest_factors": [[m, s, round(f, 5)] for (m, s), f in worst]})

    if args.ratios:
        ratios = read_ratios(args.ratios, linears, settings, slices)
        emit({"part": "ratios", "from": args.ratios})
    else:
        t0 = time.perf_counter()
        calibration = calibration_tokens(loaded.tokenizer, recipe)

        def apply_at(model, option):
            apply_plan_(model, recipe_plan(dict.fromkeys(linears, option)), calibration)

        # float32, not the product's bf16: at 6 bits bf16's own rounding is a fair share of the method's error
        table = method_option_weights(loaded.model, linears, settings, apply_at, dtype=torch.float32,
                                      progress=lambda i, n, o: emit({"part": "table-option", "option": o, "index": i,
                                                                     "seconds": round(time.perf_counter() - t0, 1)}))
        emit({"part": "table", "seconds": round(time.perf_counter() - t0, 1)})

        t0 = time.perf_counter()
        originals = {m: loaded.model.get_submodule(m).weight.detach() for m in linears}
        rtn = OptionWeights(originals)
        depth = SCAN_DEPTHS["fast"]
        ids = {s: calib_tokens(loaded.tokenizer, s, depth.calib_sequences, depth.calib_len) for s in slices}
        ratios = slice_ratios(loaded.model, block_linears(rows), originals, table, rtn, settings, ids)
        medians = {s: {o: round(float(np.median([r for (_, oo, ss), r in ratios.items() if oo == o and ss == s])), 4)
                       for o in settings} for s in slices}
        del table
        (out / "ratios.json").write_text(json.dumps([[m, o, s, round(r, 6)] for (m, o, s), r in ratios.items()]))
        emit({"part": "ratios", "seconds": round(time.perf_counter() - t0, 1), "median_ratio": medians})
    scaled = scaled_scores(scores, ratios)

    problem = build_problem(rows, scaled, slices, settings)
    for size in sizes:
        budget = float(setting_bytes(rows, linears, [size]).sum())
        solution = solve(problem, budget_bytes=budget, objective="worst", low_per_block=args.max_2bit_per_block)
        plan = recipe_plan(solution.choice, name=f"planner worst, {args.method}, {size} bytes")
        (out / f"plan-{size}.yaml").write_text(dump_plan(plan))
        # the uniform side as a plan with the same recipe: bench_peers' gptq-seq-* methods use the preset's own mix
        uniform_plan = recipe_plan(dict.fromkeys(linears, size), name=f"uniform {size}, {args.method}",
                                   description=f"Every block linear at {size}: the uniform side, on the same recipe.")
        (out / f"uniform-{size}.yaml").write_text(dump_plan(uniform_plan))
        uniform = uniform_prediction(scaled, linears, size, slices)
        emit({"part": "plan", "size": size, "status": solution.status, "gap": solution.gap,
              "seconds": round(solution.seconds, 2), "budget_bytes": budget, "planned_bytes": solution.total_bytes,
              "average_bits": solution.average_bits,
              "predicted": {s: round(v, 5) for s, v in solution.predicted.items()},
              "predicted_worst": round(max(solution.predicted.values()), 5),
              "uniform_predicted": uniform, "uniform_predicted_worst": max(uniform.values()),
              "settings_chosen": dict(sorted({o: list(solution.choice.values()).count(o)
                                              for o in set(solution.choice.values())}.items())),
              "rules": len(plan.rules), "plan": str(out / f"plan-{size}.yaml"),
              "uniform_plan": str(out / f"uniform-{size}.yaml")})


if __name__ == "__main__":
    main()
