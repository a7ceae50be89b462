"""`report`: a one-page summary (recommendation, runner-up, per-slice drops, caveats), then the Pareto view, per-slice
table, plans and provenance, as one self-contained HTML file (+ a PNG of the main figure, + the page as a PDF)."""
from __future__ import annotations

from pathlib import Path

from shrink_core.cli.entry import print_json


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="export a summary (recommended candidate, runner-up, caveats) and the "
                                            "Pareto view to one self-contained HTML file (and a PDF)")
    parser.add_argument("--out", default="report.html", help="the HTML file to write")
    parser.add_argument("--candidates", help="comma-separated candidate ids (default: all; see `candidates list`)")
    parser.add_argument("--x", default="memory", choices=["memory", "latency", "projected", "cost"])
    parser.add_argument("--y", default="worst", help="worst (the worst slice), mix (needs --weights) or a slice id")
    parser.add_argument("--metric", default="ppl_ratio",
                        choices=["ppl_ratio", "kl", "top1_agree", "accuracy", "flip_rate"])
    parser.add_argument("--weights", help="slice weights for --y mix, e.g. en=2,fr=1")
    parser.add_argument("--slices", help="comma-separated slices the worst slice is taken over (default: all)")
    parser.add_argument("--target", help="hardware row for --x projected/cost (see `measure --list-targets`; default: "
                        "the one the pages start with, h100-sxm)")
    parser.add_argument("--protocol", help="evaluation protocol to show (default: the most used)")
    parser.add_argument("--limit", type=float,
                        help="acceptable y limit, e.g. 1.05 = worst slice within +5%% of reference (ppl_ratio default)")
    parser.add_argument("--png", help="also write the main figure as a PNG (rendered by headless Chromium)")
    parser.add_argument("--pdf", nargs="?", const="", metavar="PATH",
                        help="also write the report as a PDF, summary on page 1 (printed by headless Chromium); "
                             "without PATH: beside the HTML, as --out with the suffix .pdf")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(run=run)


def _ids(text: str | None) -> tuple[int, ...] | None:
    from shrink_core.errors import ShrinkError

    if not text:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise ShrinkError(f"--candidates takes comma-separated ids like 1,2,3, not '{text}'.") from None


def _weights(text: str | None) -> tuple[tuple[str, float], ...]:
    from shrink_core.errors import ShrinkError

    if not text:
        return ()
    try:
        return tuple((k.strip(), float(v)) for k, v in (item.split("=") for item in text.split(",") if item.strip()))
    except ValueError:
        raise ShrinkError(f"--weights takes slice=weight pairs like en=2,fr=1, not '{text}'.") from None


def run(args) -> int:
    from shrink_core.errors import ShrinkError
    from shrink_core.paths import check_writable
    from shrink_core.perf.hardware import DEFAULT_TARGET, get
    from shrink_core.results.report import DEFAULT_LIMITS, View
    from shrink_core.results.report_page import write_report
    from shrink_core.results.store import Store

    check_writable(args.out, "--out")
    if args.png:
        check_writable(args.png, "--png")
    pdf = None if args.pdf is None else args.pdf or str(Path(args.out).with_suffix(".pdf"))
    if pdf and Path(pdf).resolve() == Path(args.out).resolve():
        raise ShrinkError(f"--pdf {pdf} is the HTML file itself (--out); give the PDF another name.")
    if pdf:
        check_writable(pdf, "--pdf")

    limit = args.limit if args.limit is not None else DEFAULT_LIMITS.get(args.metric)
    view = View(x=args.x, y=args.y, metric=args.metric, target=get(args.target or DEFAULT_TARGET).name, budget=args.protocol,
                candidates=_ids(args.candidates),
                slices=tuple(s.strip() for s in args.slices.split(",") if s.strip()) if args.slices else None,
                weights=_weights(args.weights), limit=limit)
    written = write_report(Store(), view, args.out, png=args.png, pdf=pdf)
    if args.json:
        print_json(written)
        return 0
    print(f"wrote {written['html']} ({len(written['candidates'])} candidates, {written['budget']} protocol; "
          f"frontier: {', '.join(written['frontier']) or 'none'})")
    print(written["verdict"])
    if written["not_plotted"]:
        print(f"not plotted (missing {args.x} or quality figure, shown as missing): {', '.join(written['not_plotted'])}")
    for kind in ("png", "pdf"):
        if kind in written:
            print(f"wrote {written[kind]}")
    return 0
