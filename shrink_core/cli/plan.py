"""`plan`: the planner from the CLI: sensitivity scores (stored, or a fast scan) -> an exact per-module allocation
under a packed-size, average-bits or projected-latency budget. `plan explain`: what each rule of a plan decides on a
model (first match wins), why, and what no rule matches."""
from __future__ import annotations

from functools import partial

from shrink_core.cli.entry import add_model_args, print_json
from shrink_core.errors import ShrinkError
from shrink_core.plan.menu import PLANNER_DEFAULT, PLANNER_SETTINGS
from shrink_core.plan.spec import INT_METHODS, METHOD_DESCRIPTIONS


def add_parser(sub) -> None:
    parser = sub.add_parser("plan", help="allocate per-module settings under a memory, bits or projected-latency budget")
    add_model_args(parser)
    budget = parser.add_mutually_exclusive_group()  # required unless a subcommand runs: checked in `run`
    budget.add_argument("--budget-mb", type=float, help="packed size budget for the whole model, MB")
    budget.add_argument("--budget-bits", type=float, help="average bits per weight over the planned modules")
    budget.add_argument("--budget-latency-ms", type=float,
                        help="projected decode ms/token (batch 1) on --target, from the roofline hardware model")
    parser.add_argument("--target", help="hardware row for --budget-latency-ms (`measure --list-targets` prints the table)")
    parser.add_argument("--objective", default="worst", help="worst (worst slice), or one slice id")
    parser.add_argument("--slices", default="en,fr,zh,code")
    parser.add_argument("--settings", default=",".join(PLANNER_DEFAULT),
                        help=f"settings the planner may choose, from: {', '.join(PLANNER_SETTINGS)} (those with "
                             "+nm24 add a 2:4 magnitude mask, counted at their sparse format's bytes: list them to "
                             "allow pruning)")
    parser.add_argument("--method", default="rtn", choices=list(INT_METHODS),
                        help="quantization method in the plan: " + " ".join(f"{m}: {METHOD_DESCRIPTIONS[m]}"
                                                                             for m in INT_METHODS))
    parser.add_argument("--rotate", action="store_true",
                        help="write the plan with its block linears' inputs rotated (rotate: hadamard, seed 0), planned "
                             "on the rotated method's stored error ratios where the Plan page's closed loop measured "
                             "them, else on the scan's plain RTN scores (the summary says which)")
    parser.add_argument("--depth", choices=["quick", "fast", "standard"], default=None,
                        help="scan depth of the scores planned on (default: the deepest stored scan that covers every "
                             "setting and slice, else a fast scan of what is missing)")
    parser.add_argument("--metric", default="kl", choices=["kl", "dnll"], help="predicted loss to minimise")
    parser.add_argument("--max-2bit-per-block", type=int, default=None, metavar="N",
                        help="at most N modules of one transformer block at 2 bits: one-module scores miss how 2-bit "
                             "errors in one block compound; measured, it helped on SmolLM2 and hurt on Gemma 3 270M "
                             "(docs/plan.md)")
    parser.add_argument("--out", help="where to write plan.yaml (required)")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(run=partial(run, parser=parser))
    commands = parser.add_subparsers(dest="plan_command", metavar="{explain,llama-cpp}")
    explain = commands.add_parser("explain", help="what each rule of a plan selects on a model, and why")
    add_model_args(explain)
    explain.add_argument("--plan", required=True, help="preset:NAME, a .yaml/.json plan file, or YAML text")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(run=run_explain)
    mix = commands.add_parser("llama-cpp", help="llama-quantize's standard mix (Q4_K_M, ...) for a model, as a plan")
    add_model_args(mix)
    mix.add_argument("--mix", required=True, help="the llama-quantize type, e.g. Q4_K_M, Q5_K_M, Q8_0, IQ4_XS")
    mix.add_argument("--imatrix", action="store_true",
                     help="quantize with an importance matrix from the plan's calibration mix")
    mix.add_argument("--out", help="write the plan here (YAML); without it, print it")
    mix.set_defaults(run=run_llama_cpp)


def run_explain(args) -> int:
    from shrink_core.model.inventory import inventory
    from shrink_core.model.load import load
    from shrink_core.plan import load_plan
    from shrink_core.plan.explain import explain

    plan = load_plan(args.plan)  # a plan that does not load is refused before the model loads
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    explanation = explain(inventory(loaded.model), plan)
    if args.json:
        print_json(explanation.to_dict())
    else:
        print(explanation.to_text())
    return 0


def run_llama_cpp(args) -> int:
    from pathlib import Path

    from shrink_core.compression.ggml.mixes import FTYPES
    from shrink_core.compression.ggml.standard import standard_plan
    from shrink_core.model.inventory import inventory, summary
    from shrink_core.model.load import load
    from shrink_core.paths import check_writable
    from shrink_core.plan import dump_plan

    if args.mix not in FTYPES:  # before the model loads
        raise ShrinkError(f"Unknown llama.cpp mix '{args.mix}'; use one of {', '.join(FTYPES)}.")
    if args.out:
        check_writable(args.out, "--out")
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    rows = inventory(loaded.model)
    text = dump_plan(standard_plan(rows, summary(loaded.model, rows), args.mix, args.imatrix))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


def run(args, parser) -> int:
    # argparse's own sentences: these were `required=True`, which would also bind `plan explain`
    if args.out is None:
        parser.error("the following arguments are required: --out")
    if (args.budget_mb, args.budget_bits, args.budget_latency_ms) == (None, None, None):
        parser.error("one of the arguments --budget-mb --budget-bits --budget-latency-ms is required")
    from dataclasses import replace
    from pathlib import Path

    from shrink_core.evaluation.calibration import CalibrationRecipe
    from shrink_core.evaluation.slices import parse_slice_list
    from shrink_core.model.inventory import inventory
    from shrink_core.model.inventory import summary as model_summary
    from shrink_core.model.load import load
    from shrink_core.paths import check_writable
    from shrink_core.perf.hardware import DEFAULT_ROWS
    from shrink_core.perf.hardware import get as get_hardware
    from shrink_core.plan import dump_plan
    from shrink_core.plan.budget import PlannerBudget, plan_within_budget
    from shrink_core.plan.planner import build_problem, solution_plan
    from shrink_core.plan.predict import score_table
    from shrink_core.plan.spec import RotateSpec
    from shrink_core.results.method_ratios import method_label, method_score_table, scored_method
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.scan import covering_depth, run_scan
    from shrink_core.sensitivity.settings import parse_settings

    check_writable(args.out, "--out")
    slice_ids = [s.id for s in parse_slice_list(args.slices)]
    setting_ids = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in setting_ids if s not in PLANNER_SETTINGS]
    if unknown:
        raise ShrinkError(f"The planner cannot use setting '{unknown[0]}'; choose from {', '.join(PLANNER_SETTINGS)}.")
    if args.budget_latency_ms is not None and not args.target:
        raise ShrinkError("--budget-latency-ms needs --target, the hardware the latency is projected for; one of "
                          f"{', '.join(r.name for r in DEFAULT_ROWS)}.")
    hardware = get_hardware(args.target) if args.target else None
    PlannerBudget("size_mb", 0.0, args.max_2bit_per_block)  # a bad cap is refused before the model loads
    if args.objective != "worst" and args.objective not in slice_ids:
        raise ShrinkError(f"The objective '{args.objective}' is not one of --slices; use worst or one of {args.slices}.")
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    setting_ids = [s.id for s in parse_settings(",".join(setting_ids))]
    # plan on the scan the user already ran (a `sensitivity --depth quick` is not redone at fast depth)
    depth = args.depth or covering_depth(Store(), loaded, slice_ids, setting_ids) or "fast"
    report = run_scan(loaded, slice_ids, setting_ids, method="fast", budget=depth,
                      store=Store())  # reused from the store when this model, setting, slice and depth were scanned
    # a calibrated method plans on its own error where the closed loop stored its ratios (the plan written here
    # calibrates with the default recipe, so those are the ratios that describe it)
    rotate = RotateSpec() if args.rotate else None
    scored = scored_method(args.method, rotate)  # a rotated plan errs as its own method, RTN included
    scores, ratios = method_score_table(Store(), loaded.spec.raw, loaded.weights_hash, scored,
                                        CalibrationRecipe().to_dict(), score_table(report.records, args.metric))
    rows = inventory(loaded.model)
    problem = build_problem(rows, scores, slice_ids, setting_ids, hardware=hardware)
    kind, value = next((k, v) for k, v in (("size_mb", args.budget_mb), ("bits_per_weight", args.budget_bits),
                                            ("latency_ms", args.budget_latency_ms)) if v is not None)
    planned = plan_within_budget(problem, rows, model_summary(loaded.model, rows),
                                 PlannerBudget(kind, value, args.max_2bit_per_block),
                                 objective=args.objective, hardware=hardware)  # the rest stays as loaded
    solution = planned.solution
    plan = solution_plan(solution.choice, rows, method=args.method, name=f"planner {args.objective}")
    if rotate is not None:
        plan = replace(plan, rotate=rotate, name=f"{plan.name}, inputs rotated")
    Path(args.out).write_text(dump_plan(plan))
    summary = {"out": args.out, "status": solution.status, "gap": solution.gap, "seconds": round(solution.seconds, 3),
               "solver": solution.solver, "planned_bytes": planned.total_bytes,
               "average_bits_planned_modules": solution.average_bits, "predicted": solution.predicted,
               "metric": args.metric, "depth": depth, "computed_scores": report.computed,
               "max_2bit_per_block": args.max_2bit_per_block,
               "scores": (f"the {depth} scan's RTN scores" if ratios is None and rotate is None else
                          f"the {depth} scan's plain RTN scores: no {method_label(scored)} error ratios are stored "
                          "(the Plan page's closed loop measures them)" if ratios is None else
                          f"the {depth} scan's scores scaled by {method_label(scored)}'s stored output error over "
                          f"RTN's (median {ratios.medians()})"),
               "settings": dict(sorted(
                   {s: list(solution.choice.values()).count(s) for s in set(solution.choice.values())}.items())),
               "embedding": {r.name: solution.choice[r.name] for r in rows
                             if r.kind in ("embedding", "lm_head") and r.name in solution.choice}}
    if planned.projected_ms is not None:
        summary["projected_decode_ms"] = round(planned.projected_ms, 4)
        summary["target"], summary["projection"] = planned.target, planned.basis
    if args.json:
        print_json(summary)
    else:
        print(f"wrote {args.out}: {summary['status']} (gap {solution.gap:.1e}) in {solution.seconds:.2f} s, "
              f"{summary['planned_bytes'] / 1e6:,.1f} MB; predicted {args.metric} per slice {solution.predicted} "
              f"from {summary['scores']}")
        if planned.projected_ms is not None:
            print(f"projected decode {summary['projected_decode_ms']:.3f} ms/token on {planned.target} "
                  f"({planned.basis})")
    return 0
