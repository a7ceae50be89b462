"""`sensitivity`: per-module sensitivity (KL, dNLL) under quantization/pruning settings, per slice."""
from __future__ import annotations

from shrink_core.cli.entry import add_executor_args, add_model_args, executor_config, print_json_line
from shrink_core.plan.menu import MENU, SCAN_DEFAULT  # torch-free, so every CLI start stays fast


def add_parser(sub) -> None:
    parser = sub.add_parser("sensitivity", help="score every block linear under settings, per slice (fast or exhaustive)")
    add_model_args(parser)
    parser.add_argument("--slices", default="en", help="comma-separated slice ids (see `slices list`)")
    parser.add_argument("--settings", default=",".join(SCAN_DEFAULT), help=f"comma-separated, from: {', '.join(MENU)}")
    parser.add_argument("--method", default="fast", choices=["fast", "exhaustive"])
    parser.add_argument("--depth", default="fast", choices=["quick", "fast", "standard"],
                        help="probe/calibration sequences x length (quick 4x64, fast 8x128, standard 16x256)")
    parser.add_argument("--modules", help="regex on module names (searched), e.g. 'layers\\.(0|29)\\.'")
    parser.add_argument("--metric", default="kl", choices=["kl", "dnll", "both"])
    parser.add_argument("--check", type=int, default=0,
                        help="fast only: also probe this many modules exhaustively and report the Spearman per slice")
    add_executor_args(parser)
    parser.add_argument("--json", action="store_true",
                        help="print JSON lines: one per slice as it finishes, then the whole report on the last line")
    parser.set_defaults(run=run)


def run(args) -> int:
    import time

    from shrink_core.evaluation.slices import parse_slice_list
    from shrink_core.model.load import load
    from shrink_core.perf import footprint
    from shrink_core.results.store import Store
    from shrink_core.sensitivity import run_scan
    from shrink_core.sensitivity.scan import admit_scan
    from shrink_core.sensitivity.settings import parse_settings

    started = time.perf_counter()
    slices = [s.id for s in parse_slice_list(args.slices)]
    settings = [s.id for s in parse_settings(args.settings)]
    executor = executor_config(args)
    if executor.kind == "ray":
        return _run_units(args, slices, settings, executor, started)
    description = Store().latest_model(args.model)  # described before (inspect, Model page): refuse before loading
    if description:
        admit_scan(footprint.facts_from_description(description), args.method, args.depth, settings)
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    metrics = ("kl", "dnll") if args.metric == "both" else (args.metric,)

    def part(slice_id, records):
        if args.json:
            print_json_line({"part": slice_id, "records": len(records),
                             "seconds_so_far": round(time.perf_counter() - started, 3)})
        else:
            print(f"  {slice_id}: {len(records)} records stored ({time.perf_counter() - started:.0f} s so far)",
                  flush=True)

    report = run_scan(loaded, slices, settings, args.method, args.depth, args.modules, args.check, metrics,
                      part=part)
    payload = report.to_dict()
    payload["seconds_with_load"] = round(time.perf_counter() - started, 3)
    if args.json:
        print_json_line(payload)
        return 0
    print(f"{report.model} {args.method} depth={args.depth}: {len(report.records)} records in {report.seconds:.1f} s "
          f"({report.computed} computed, {report.reused} reused from the store)")
    for slice_id in slices:
        for setting in settings:
            top = sorted((r for r in report.records if r.slice == slice_id and r.setting == setting),
                         key=lambda r: -r.value)[:5]
            print(f"  {slice_id:<6} {setting:<7} most sensitive: " +
                  ", ".join(f"{r.module.replace('model.layers.', 'L')} {r.metric}={r.value:.3g}" for r in top))
    for a in report.agreement:
        print(f"  agreement {a.slice} {a.setting} {a.metric}: Spearman {a.spearman:.3f} over {a.modules} modules")
    return 0


def _run_units(args, slices: list[str], settings: list[str], executor, started: float) -> int:
    """The scan as units on Ray: the same stored records; printed as they are stored, then the top modules."""
    import time

    from shrink_core.results.store import Store
    from shrink_core.sensitivity.scan import stored_records
    from shrink_core.sensitivity.units import run_scan_units

    def part(slice_id):
        if args.json:
            print_json_line({"part": slice_id, "seconds_so_far": round(time.perf_counter() - started, 3)})
        else:
            print(f"  {slice_id}: stored ({time.perf_counter() - started:.0f} s so far)", flush=True)

    store = Store()
    report = run_scan_units(args.model, slices, settings, args.method, args.depth, args.check, executor, store=store,
                            part=part, modules=args.modules)
    if args.json:
        print_json_line(report)
        return 0
    print(f"{args.model} {args.method} depth={args.depth} on ray: {report['units']} units on "
          f"{len(report['workers'])} workers in {report['seconds']:.1f} s")
    records = [r for r in stored_records(store, args.model, report["weights_hash"])
               if r.slice in slices and r.budget == args.depth and r.metric == "kl"]
    for slice_id in slices:
        for setting in settings:
            top = sorted((r for r in records if r.slice == slice_id and r.setting == setting), key=lambda r: -r.value)
            print(f"  {slice_id:<6} {setting:<7} most sensitive: " +
                  ", ".join(f"{r.module.replace('model.layers.', 'L')} kl={r.value:.3g}" for r in top[:5]))
    for a in report["agreement"]:
        print(f"  agreement {a['slice']} {a['setting']} {a['metric']}: Spearman {a['spearman']:.3f} over "
              f"{a['modules']} modules")
    return 0
