"""Local steps from a mixed plan, every step applied and measured by the sequential method itself (gptq-seq).

  python bench/bench_seqlocal.py --start DIR/plan-w3g64.yaml --size w3g64 [--slices en,fr,zh,code,arith]
                                 [--options w3g128,w3g64,w4g128,w4g64,w6g64] [--steps 3] [--max-changes 40] --out OUT
  then: python bench/bench_peers.py --slices ... --windows 8 --plan OUT/plan-local.yaml --out OUT/peers

Why: the planner's one-module scores, even scaled by gptq-seq's own output error (bench_mixed.py), predicted the plan
at W3 g64's bytes at 0.61x uniform and it measured 0.90x (0.86x without 2-bit modules; docs/plan.md). gptq-seq fits
each layer to the full-precision model on inputs that went through the quantized layers before it, so part of an
earlier module's error is absorbed later; a sum of one-module scores cannot see that. This runs the product's local
refinement (`plan/local.local_search`, the closed loop's local steps) with the method in the loop:
1. the method's weight table: every planned module at each option, applied uniformly by the product's path (float32);
2. the start plan applied by the method and measured: KL(reference || plan) on each slice's calibration rows at the
   fast scan depth (never eval rows);
3. scores at that plan (`sensitivity/local.local_scores`: the gradient of KL at the plan applied by the method, each
   move's error the table's weight minus the plan's, the whole Fisher from per-sequence gradients);
4. the planner moves at most K modules under the same bytes, the new plan is applied by the method and measured, and
   kept only if the worst slice improved (else K halves); repeat.
Each step's predicted against measured worst slice is the interaction the sums miss, measured. The kept plan is
written with the start plan's calibration recipe, to be measured on the eval rows by bench_peers (paired CIs).
Writes OUT/seqlocal.jsonl (each part's seconds and load average) and OUT/plan-local.yaml.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from bench_peers import emit as emit_line  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--start", required=True, help="a plan YAML over the block linears (bench_mixed.py writes one)")
    parser.add_argument("--size", default="w3g64", help="the uniform setting whose block-linear bytes are the budget")
    parser.add_argument("--slices", default="en,fr,zh,code,arith")
    parser.add_argument("--options", default="w3g128,w3g64,w4g128,w4g64,w6g64",
                        help="settings a step may move a module to (with the start plan's own, and keep)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-changes", type=int, default=40)
    parser.add_argument("--calib-sequences", type=int, default=None,
                        help="the method's calibration windows (default: the start plan's recipe; fewer for a smoke run)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens
    from shrink_core.model.inventory import block_linears, inventory
    from shrink_core.model.load import load
    from shrink_core.plan import dump_plan, load_plan, plan_from_dict, plan_to_dict, resolve
    from shrink_core.plan.local import local_problem, local_search
    from shrink_core.plan.menu import QUANT_SETTINGS
    from shrink_core.plan.planner import setting_bytes, solution_plan
    from shrink_core.plan.predict import settings_by_module
    from shrink_core.sensitivity.local import local_scores, method_option_weights
    from shrink_core.sensitivity.probe import SCAN_DEPTHS, ProbeCache, calib_tokens, whole_model_kl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / "seqlocal.jsonl").open("w")
    emit = partial(emit_line, handle=handle)  # one JSON line, with the load average, printed and written

    slices = args.slices.split(",")
    start_plan = load_plan(Path(args.start).read_text())
    methods = {r.weights.method for r in start_plan.rules if r.weights is not None}
    if len(methods) != 1:
        raise SystemExit(f"{args.start} uses {sorted(methods) or 'no'} method(s); this bench needs exactly one.")
    method = methods.pop()
    recipe = start_plan.calibration or CalibrationRecipe()
    if args.calib_sequences:
        from dataclasses import replace

        recipe = replace(recipe, n_sequences=args.calib_sequences)
    loaded = load(args.model)
    rows = inventory(loaded.model)
    linears = [r.name for r in block_linears(rows)]
    start = {m: s for m, s in settings_by_module(resolve(rows, start_plan)).items() if m in set(linears)}
    if set(start) != set(linears) or "keep" in start.values():
        raise SystemExit(f"{args.start} must set every block linear; it leaves "
                         f"{len(set(linears) - {m for m, s in start.items() if s != 'keep'})} at full precision.")
    options = ["keep", *dict.fromkeys([*args.options.split(","), *sorted(set(start.values()))])]
    unknown = sorted(set(options[1:]) - set(QUANT_SETTINGS))
    if unknown:
        raise SystemExit(f"--options: {', '.join(unknown)} is not a weight setting of the menu.")
    budget = float(setting_bytes(rows, linears, [args.size]).sum())
    start_bytes = float(sum(setting_bytes(rows, [m], [s])[0, 0] for m, s in start.items()))
    calibration = calibration_tokens(loaded.tokenizer, recipe)
    emit({"part": "setup", "model": args.model, "weights_hash": loaded.weights_hash, "method": method,
          "start": args.start, "size": args.size, "budget_bytes": budget, "start_bytes": start_bytes,
          "slices": slices, "options": options, "calibration": recipe.to_dict(), "kept_fp32": "embedding and head",
          "torch_threads": torch.get_num_threads()})

    def plan_of(choice, name):
        data = plan_to_dict(solution_plan(choice, rows, method, name=name))
        return plan_from_dict({**data, "calibration": recipe.to_dict()})

    t0 = time.perf_counter()
    table = method_option_weights(
        loaded.model, linears, options,
        lambda model, option: apply_plan_(model, plan_of(dict.fromkeys(linears, option), option), calibration),
        dtype=torch.float32,
        progress=lambda i, n, o: emit({"part": "table-option", "option": o, "index": i,
                                       "seconds": round(time.perf_counter() - t0, 1)}))
    emit({"part": "table", "seconds": round(time.perf_counter() - t0, 1)})

    depth = SCAN_DEPTHS["fast"]
    ids = {s: calib_tokens(loaded.tokenizer, s, depth.calib_sequences, depth.calib_len) for s in slices}
    caches = {s: ProbeCache(loaded.model, ids[s], chunk=depth.chunk) for s in slices}
    originals = {m: loaded.model.get_submodule(m).weight.detach() for m in linears}
    last: dict = {}

    def applied(choice):
        """The plan applied by the method to a copy of the model; the last one is kept (a step scores where it
        was measured)."""
        key = tuple(sorted(choice.items()))
        if last.get("key") != key:
            last.clear()
            t = time.perf_counter()
            model = copy.deepcopy(loaded.model)
            apply_plan_(model, plan_of(choice, "step"), calibration)
            last.update(key=key, model=model.eval(), seconds=round(time.perf_counter() - t, 1))
        return last["model"]

    def measure(choice):
        t = time.perf_counter()
        model = applied(choice)
        kl = {s: whole_model_kl(caches[s], model).kl for s in slices}
        emit({"part": "measure", "apply_seconds": last["seconds"], "seconds": round(time.perf_counter() - t, 1),
              "kl": {s: round(v, 5) for s, v in kl.items()}, "worst": round(max(kl.values()), 5)})
        return kl

    def scores_at(choice):
        t = time.perf_counter()
        local = local_scores(loaded.model, applied(choice), originals, choice, options, ids, weights=table,
                             quadratic="sequence")
        emit({"part": "scores", "seconds": round(time.perf_counter() - t, 1), "tokens": local.tokens})
        return local_problem(rows, local.deltas, linears, options, slices)

    def on_step(step):
        emit({"part": "step", "index": step.index, "max_changes": step.max_changes, "changes": step.changes,
              "predicted": {s: round(v, 5) for s, v in step.predicted.items()},
              "measured": {s: round(v, 5) for s, v in step.measured.items()},
              "worst_predicted": round(step.worst_predicted, 5), "worst_measured": round(step.worst_measured, 5),
              "error": round(step.error, 4), "accepted": step.accepted, "seconds": round(step.seconds, 1),
              "moves": sorted(f"{m}: {start_of[m]} -> {step.choice[m]}" for m in step.choice
                              if step.choice[m] != start_of[m])})
        if step.accepted:
            start_of.update(step.choice)

    start_of = dict(start)  # the plan each step moved from, for its list of moves
    t0 = time.perf_counter()
    first = measure(start)
    steps = local_search(start, first, scores_at, measure, limits={"budget_bytes": budget}, steps=args.steps,
                         max_changes=args.max_changes, time_budget_s=float("inf"), on_step=on_step)
    kept = [s for s in steps if s.accepted]
    choice = kept[-1].choice if kept else start
    name = f"{Path(args.start).stem} + {len(kept)} local steps measured by {method}"
    (out / "plan-local.yaml").write_text(dump_plan(plan_of(choice, name)))
    emit({"part": "result", "seconds": round(time.perf_counter() - t0, 1), "start_worst": round(max(first.values()), 5),
          "kept_worst": round(max((kept[-1].measured if kept else first).values()), 5), "steps": len(steps),
          "kept_steps": len(kept), "bytes": float(sum(setting_bytes(rows, [m], [s])[0, 0] for m, s in choice.items())),
          "settings_chosen": dict(sorted({o: list(choice.values()).count(o) for o in set(choice.values())}.items())),
          "plan": str(out / "plan-local.yaml")})
    handle.close()


if __name__ == "__main__":
    main()
