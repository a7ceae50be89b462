"""`distill`: train a smaller student (blocks dropped by influence, width pruned) or recover a stored candidate."""
from __future__ import annotations

import sys

from shrink_core.cli.entry import print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("distill", help="distil a teacher into a smaller student (or recover a candidate)")
    parser.add_argument("--teacher", default="builtin:smollm2-135m", help="builtin:NAME, a directory or a .gguf file")
    parser.add_argument("--drop-blocks", default="",
                        help="a count (10: the blocks of lowest block influence) or a list of block indices (3,5,7)")
    parser.add_argument("--mlp-prune", type=float, default=0.0, help="share of MLP channels removed in every block")
    parser.add_argument("--from", dest="student_dir", help="a stored candidate directory to recover instead")
    parser.add_argument("--mix", default="en=1", help="calibration mix for training data, e.g. en=0.6,code=0.2,fr=0.2")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--ce-weight", type=float, default=0.0, help="weight of the plain next-token loss")
    parser.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state alignment loss")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up steps (then cosine decay)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--slices", help="slices the student is evaluated on at the end (default en; a resumed run "
                                         "keeps its own)")
    parser.add_argument("--protocol", choices=["fast", "standard", "full"],
                        help="evaluation protocol (default fast; a resumed run keeps its own)")
    parser.add_argument("--name", help="run name (default: run-<time>); state lives in $SHRINK_HOME/distill/<name>/")
    parser.add_argument("--resume", action="store_true", help="continue the run --name from its last checkpoint")
    parser.add_argument("--out", help="also copy the finished student directory here")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    import shutil
    from pathlib import Path

    from shrink_core.distill import DistillConfig, parse_drop_blocks, parse_mix
    from shrink_core.distill.run import run_distill
    from shrink_core.errors import ShrinkError
    from shrink_core.paths import check_replaceable, check_writable

    if args.out:  # checked before the run, so a finished student is never lost to a bad --out
        check_replaceable(check_writable(args.out, "--out", directory=True, replace=True), "--out", "provenance.json")
    if args.resume and not args.name:
        raise ShrinkError("--resume needs --name RUN (see the run names under $SHRINK_HOME/distill/).")
    blocks, count = parse_drop_blocks(args.drop_blocks)
    config = DistillConfig(
        teacher=args.teacher, drop_blocks=blocks, drop_count=count, mlp_prune=args.mlp_prune,
        student_dir=str(Path(args.student_dir).resolve()) if args.student_dir else None, mix=parse_mix(args.mix),
        seq_len=args.seq_len, batch_size=args.batch_size, steps=args.steps, lr=args.lr,
        warmup_steps=min(args.warmup, args.steps), temperature=args.temperature, ce_weight=args.ce_weight,
        hidden_weight=args.hidden_weight, checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device)

    def progress(fraction: float, message: str = "") -> None:
        if not args.json:
            print(f"\r[{fraction:5.0%}] {message:<50}", end="", file=sys.stderr, flush=True)

    slices = [s.strip() for s in args.slices.split(",") if s.strip()] if args.slices is not None else None
    report = run_distill(config, name=args.name, slices=slices, budget=args.protocol, resume=args.resume,
                         progress=progress)
    if not args.json:
        print(file=sys.stderr)
    if args.out and report.get("student_dir"):
        out = Path(args.out)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(report["student_dir"], out)
        report["out"] = str(out)
    if args.json:
        print_json(report)
        return 0
    print(f"run {report['run']}: step {report['step']}/{report['steps']}, dropped blocks {report['dropped_blocks']}, "
          f"student {report['student_params']:,} params (teacher {report['teacher_params']:,})")
    for slice_id, r in report.get("slices", {}).items():
        print(f"  {slice_id:<10} ppl {r['ppl']:.3f} (teacher {r['teacher_ppl']:.3f})  KL {r.get('kl', float('nan')):.4f}")
    if report.get("student_dir"):
        print(f"student saved in {report.get('out') or report['student_dir']} (candidate {report['candidate_id']})")
    return 0
