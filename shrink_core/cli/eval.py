"""`eval`: per-slice perplexity, bits per byte, task accuracy, with confidence intervals; against a plan, KL and flips."""
from __future__ import annotations

from shrink_core.cli.entry import add_model_args, print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("eval", help="evaluate a model (and optionally a plan) on evaluation slices")
    add_model_args(parser)
    parser.add_argument("--slices", default="en", help="comma-separated slice ids (see `slices list`)")
    parser.add_argument("--budget", default="fast", choices=["fast", "standard", "full"])
    parser.add_argument("--plan", help="a plan file, YAML text or preset:NAME; compares against the unplanned model")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.evaluation.stats import format_interval
    from shrink_core.results.eval_run import run_eval

    ids = [s.strip() for s in args.slices.split(",") if s.strip()]
    report = run_eval(args.model, ids, args.budget, args.plan, allow_pickle=args.allow_pickle,
                      trust_remote_code=args.trust_remote_code)
    if args.json:
        print_json(report)
        return 0
    print(f"{report['model']} budget={report['budget']} ({report['seconds']:.1f} s on {report['device']})")
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
    return 0
