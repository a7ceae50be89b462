"""`eval`: per-slice perplexity, bits per byte, task accuracy, with confidence intervals; against a plan, KL and flips."""
from __future__ import annotations

from shrink_core.cli.entry import add_model_args, add_onload_arg, print_json_line


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="evaluate a model (and optionally a plan) on evaluation slices")
    add_model_args(parser)
    parser.add_argument("--slices", default="en", help="comma-separated slice ids (see `slices list`)")
    parser.add_argument("--protocol", default="fast", choices=["fast", "standard", "full"],
                        help="which tokens are scored (docs/evaluation.md); fixed per protocol")
    parser.add_argument("--plan", help="a plan file, YAML text or preset:NAME; compares against the unplanned model")
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines: one per slice as it finishes, then the whole report on the last line")
    add_onload_arg(parser, "evaluation (and a --plan's compression)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.evaluation.slices import get_slice
    from shrink_core.evaluation.stats import format_interval
    from shrink_core.model.arch import onloading
    from shrink_core.model.load import load, onload_device, onload_spec
    from shrink_core.results.eval_run import run_eval
    from shrink_core.results.store import Store

    ids = [s.strip() for s in args.slices.split(",") if s.strip()]
    for slice_id in ids:  # a bad slice fails before the model loads
        get_slice(slice_id)
    if args.onload:
        onload_device(args.onload)
        args.model = onload_spec(args.model)
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    store = Store()

    def part(slice_id, entry):
        if args.json:
            print_json_line({"part": slice_id, **entry})

    with onloading(args.onload):
        report = run_eval(args.model, ids, args.protocol, args.plan, store=store, loaded=loaded, part=part)
    if args.onload:
        report["onload"] = args.onload
    if args.plan and report.get("candidate_id"):
        report["predicted_vs_measured"] = _predicted_vs_measured(store, loaded, args.plan, report["candidate_id"])
    gap_sentence = _mix_gaps(args.plan, ids, report) if args.plan else None
    if args.json:
        print_json_line(report)
        return 0
    onloaded = f", each block onloaded to {args.onload}" if args.onload else ""
    print(f"{report['model']} protocol={report['budget']} ({report['seconds']:.1f} s on {report['device']}{onloaded})")
    for slice_id, r in report["slices"].items():
        line = f"  {slice_id:<12} ppl {r['ppl']:.3f} {format_interval(r.get('ppl_ci'), r['items'])}"
        if "bpb" in r:
            line += f"  bpb {r['bpb']:.4f}"
        if "accuracy" in r:
            line += f"  acc {r['accuracy']:.3f} {format_interval(r.get('accuracy_ci'), r['items'])}"
        if "kl" in r:
            line += f"  KL {r['kl']:.4f} (p99 {r['kl_p99']:.3f})  top1 {r['top1_agree']:.3f}"
        if "flips" in r:
            line += f"  flips {r['flips']['total']}"
        print(line + f"  ({r['tokens']:,} tokens, {r['items']} items)")
    for row in report.get("predicted_vs_measured", []):
        predicted = "no scan score" if row["predicted ΔNLL"] is None else f"{row['predicted ΔNLL']:+.4f}"
        measured = "no reference" if row["measured ΔNLL"] is None else f"{row['measured ΔNLL']:+.4f}"
        print(f"  {row['slice']:<12} ΔNLL predicted {predicted} (additive scan scores), measured {measured} nats/token")
    if gap_sentence:
        print(f"note: {gap_sentence}")
    return 0


def _mix_gaps(plan_text: str, ids: list[str], report: dict) -> str | None:
    """The scored slices a calibrated plan's mix leaves out: in the JSON report, and the sentence for the text one."""
    from dataclasses import asdict

    from shrink_core.evaluation.calibration import mix_gaps, mix_gaps_sentence, recipe_for
    from shrink_core.plan import load_plan

    plan = load_plan(plan_text)
    if not plan.needs_calibration:
        return None
    gaps = mix_gaps(recipe_for(plan), ids)
    report["calibration_gaps"] = asdict(gaps)
    return mix_gaps_sentence(gaps)


def _predicted_vs_measured(store, loaded, plan_text: str, candidate_id: int) -> list[dict]:
    """The Plan page's table: predicted ΔNLL from the stored scan (empty without one) beside the measured figures."""
    from shrink_core.plan import load_plan, resolve
    from shrink_core.results.prediction import predicted_vs_measured
    from shrink_core.sensitivity.scan import stored_records

    records = stored_records(store, loaded.spec.raw, loaded.weights_hash)
    return predicted_vs_measured(store, loaded.spec.raw, candidate_id, resolve(loaded.model, load_plan(plan_text)),
                                 records)
