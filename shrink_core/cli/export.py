"""`export`: apply a plan and write the artifact a runtime serves: a GGUF file for llama.cpp (llama.cpp types in the
plan), or a compressed-tensors directory for transformers and vLLM (int4/int8 in the plan). The weights written are
exactly those the dashboard evaluates for the same plan."""
from __future__ import annotations

import sys

from shrink_core.cli.entry import add_model_args, print_json, stderr_progress

FORMATS = ("gguf", "compressed-tensors")


def add_parser(sub) -> None:
    parser = sub.add_parser("export", help="apply a plan and write a GGUF file or a compressed-tensors directory")
    add_model_args(parser)
    parser.add_argument("--plan", required=True, help="preset:NAME, a .yaml/.json plan file, or YAML text")
    parser.add_argument("--format", required=True, choices=FORMATS,
                        help="gguf (llama.cpp; the plan's modules in llama.cpp types) or compressed-tensors "
                             "(transformers / vLLM; int4 or int8 modules)")
    parser.add_argument("--out", required=True, help="the .gguf file, or the directory for compressed-tensors")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from pathlib import Path

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.errors import ShrinkError
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.model.load import load
    from shrink_core.paths import check_replaceable, check_writable
    from shrink_core.plan import load_plan, plan_to_dict

    plan = load_plan(args.plan)
    if args.format == "gguf":
        if not args.out.endswith(".gguf"):
            raise ShrinkError(f"--out for a GGUF export is a file ending in .gguf, not '{args.out}'.")
        check_writable(args.out, "--out")
    else:
        out = check_writable(args.out, "--out", directory=True, replace=True)
        check_replaceable(out, "--out", marker="provenance.json")
    loaded = load(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    calibration, recipe = plan_calibration(plan, loaded.tokenizer)

    report = apply_plan_(loaded.model, plan, calibration, stderr_progress(args.json), recipe=recipe)
    if not args.json:
        print(file=sys.stderr)
    provenance = {"model_spec": loaded.spec.raw, "weights_hash": loaded.weights_hash, "calibration": recipe,
                  "plan": plan_to_dict(plan)}
    if args.format == "gguf":
        from shrink_core.compression.gguf_export import write_candidate_gguf

        written = write_candidate_gguf(loaded, loaded.model, report, Path(args.out), provenance)
    else:
        from shrink_core.compression.ct_export import write_compressed_tensors

        written = {"compressed-tensors": write_compressed_tensors(loaded.model, loaded.tokenizer, report, args.out,
                                                                  provenance)}
    sizes = {k: sum(f.stat().st_size for f in ([v] if v.is_file() else v.rglob("*"))) for k, v in written.items()}
    summary = {"written": {k: str(v) for k, v in written.items()}, "bytes": sizes,
               "total_packed_bytes": report.totals["total_packed_bytes"], "notes": report.notes}
    if args.json:
        print_json(summary)
        return 0
    for kind, path in written.items():
        print(f"wrote {path} ({sizes[kind] / 1e6:.1f} MB)")
    for note in report.notes:
        print(f"note: {note}")
    return 0
