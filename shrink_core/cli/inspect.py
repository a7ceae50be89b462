"""`inspect`: the layer inventory and model summary, as on the Model page."""
from __future__ import annotations

from shrink_core.cli.entry import add_model_args, print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("inspect", help="load a model and list its compressible modules")
    add_model_args(parser)
    parser.add_argument("--json", action="store_true", help="print JSON (summary + modules)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.model.describe import describe

    report = describe(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    from shrink_core.results.store import Store

    Store().save_model(report)  # as the Model page does: later jobs predict their memory before loading the model
    if args.json:
        print_json(report)
        return 0
    s = report["summary"]
    print(f"{report['spec']}: {s['architecture']}, {s['parameters']:,} parameters, {s['blocks']} blocks, "
          f"{s['block_linears']} block linears, loaded in {report['load_seconds']:.1f} s"
          f"{' (cached)' if report['from_cache'] else ''}")
    if s.get("uncovered"):
        print(s["uncovered"])
    for row in report["modules"]:
        tied = f"  (tied to {row['tied_to']})" if row["tied_to"] else ""
        print(f"  {row['name']:<50} {row['kind']:<10} {row['shape']:>12} {row['params']:>12,}{tied}")
    return 0
