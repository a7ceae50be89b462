"""`apply`: compress a model with a plan and write the candidate (weights, plan.yaml, provenance, exports)."""
from __future__ import annotations

import json
import sys

from shrink_core.cli.entry import add_model_args, add_onload_arg, print_json, stderr_progress


def add_parser(sub) -> None:
    parser = sub.add_parser("apply", help="apply a plan to a model and save the candidate")
    add_model_args(parser)
    parser.add_argument("--plan", required=True, help="preset:NAME, a .yaml/.json plan file, or YAML text")
    parser.add_argument("--out", help="directory to write the candidate to (required unless --resolve-only)")
    parser.add_argument("--calibration", default=None,
                        help='calibration recipe as JSON, e.g. \'{"mix": {"en": 1}, "n_sequences": 16, "seq_len": 512, '
                             '"seed": 0}\' (default: the plan\'s own recipe, else that one)')
    add_onload_arg(parser, "calibration and compression")
    parser.add_argument("--resolve-only", action="store_true", help="print the resolved table and stop")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from dataclasses import replace

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.compression.export import save_candidate, write_exports
    from shrink_core.errors import ShrinkError
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.model.load import load, onload_device, onload_spec
    from shrink_core.paths import check_replaceable, check_writable
    from shrink_core.plan import CalibrationRecipe, load_plan, resolve

    plan = load_plan(args.plan)
    if not args.out and not args.resolve_only:
        raise ShrinkError("apply needs --out DIR to write the candidate to (or --resolve-only to just show the table).")
    if args.calibration:  # an explicit override becomes the plan's own recipe, so it is recorded with the result
        try:
            data = json.loads(args.calibration)
        except ValueError as exc:
            raise ShrinkError(f"--calibration is not valid JSON ({exc}); give e.g. "
                              '\'{"mix": {"en": 1}, "n_sequences": 16, "seq_len": 512, "seed": 0}\'.') from None
        plan = replace(plan, calibration=CalibrationRecipe.from_dict(data))
    if args.out and not args.resolve_only:  # checked before minutes of work, and nothing of the user's is replaced
        out = check_writable(args.out, "--out", directory=True, replace=True)
        check_replaceable(out, "--out", marker="provenance.json")
    if args.onload:
        onload_device(args.onload)
        args.model = onload_spec(args.model)
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    resolved = resolve(loaded.model, plan)
    if args.resolve_only:
        print_json([r.row() for r in resolved])
        return 0
    if loaded.tokenizer is None:  # a candidate is saved with its tokenizer, so it can be evaluated and reloaded
        raise ShrinkError(f"The model {args.model} has no tokenizer, which a saved candidate needs; use a model "
                          "directory that includes its tokenizer files.")
    calibration, recipe = plan_calibration(plan, loaded.tokenizer)

    report = apply_plan_(loaded.model, plan, calibration, stderr_progress(args.json), recipe=recipe,
                         onload=args.onload)
    if not args.json:
        print(file=sys.stderr)
    provenance = {"model_spec": loaded.spec.raw, "weights_hash": loaded.weights_hash, "calibration": recipe,
                  **({"onload": args.onload} if args.onload else {})}
    out = save_candidate(loaded.model, loaded.tokenizer, plan, args.out, provenance, report)
    exports = write_exports(resolved, out / "exports", plan.rotate, plan.tune)
    summary = {"out": str(out), "totals": report.totals, "timings_s": report.timings, "calibration": recipe,
               "exports": {k: str(v) for k, v in exports.items()}, "notes": report.notes}
    if args.json:
        print_json({**summary, "modules": report.rows()})
        return 0
    t = report.totals
    print(f"wrote {out}: packed {t['total_packed_bytes'] / 1e6:.1f} MB (was {t['dense_bytes_before'] / 1e6:.1f} MB), "
          f"{report.timings['total_s']:.1f} s; exports in {out / 'exports'}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
