"""`sweep`: plans x slices -> candidates, each plan applied once and scored on every slice, locally or on Ray."""
from __future__ import annotations

from shrink_core.cli.entry import add_executor_args, add_model_args, executor_config, print_json_line, stderr_progress


def add_parser(sub) -> None:
    parser = sub.add_parser("sweep", help="score many plans on many slices (one candidate each), locally or on Ray")
    add_model_args(parser)
    parser.add_argument("--plans", nargs="+", required=True,
                        help="preset:NAME and plan files (e.g. the planner's plans at several budgets, written by "
                             "`plan --budget-mb N --out pN.yaml`), space- or comma-separated")
    parser.add_argument("--slices", default="en", help="comma-separated slice ids (see `slices list`)")
    parser.add_argument("--protocol", default="fast", choices=["fast", "standard", "full"],
                        help="which tokens are scored (docs/evaluation.md)")
    add_executor_args(parser)
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines: one per plan x slice as it is stored, then the whole report")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.results.store import Store
    from shrink_core.runtime.sweep import SweepIncomplete, run_sweep

    plans = [p.strip() for entry in args.plans for p in (entry.split(",") if "\n" not in entry else [entry])
             if p.strip()]
    slices = [s.strip() for s in args.slices.split(",") if s.strip()]

    def part(name, entry):
        if args.json:
            print_json_line({"part": name, **entry})

    try:
        report = run_sweep(args.model, plans, slices, args.protocol, executor_config(args), store=Store(),
                           progress=stderr_progress(args.json), part=part)
    except SweepIncomplete as exc:
        if args.json:
            print_json_line(exc.report)
        raise
    if args.json:
        print_json_line(report)
        return 0
    print(f"\n{report['model']} protocol={report['budget']}: {len(report['plans'])} plans x {len(slices)} slices on "
          f"{report['executor']['kind']} ({len(report['workers'])} worker processes, {report['seconds']:.1f} s)")
    for name, entry in report["results"].items():
        if "kl" in entry:
            print(f"  {name:<32} KL {entry['kl']:.4f}  top1 {entry['top1_agree']:.3f}  ppl {entry['ppl']:.3f}")
    print("  candidates: " + ", ".join(f"{label} (#{cid})" for label, cid in report["candidates"].items()))
    return 0
