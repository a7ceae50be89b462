"""`tools llama-cpp | status`: build llama.cpp's CPU tools (an optional runtime) and say what is built."""
from __future__ import annotations

import os
import sys

from shrink_core.cli.entry import print_json
from shrink_core.errors import ShrinkError


def add_parser(sub) -> None:
    parser = sub.add_parser("tools", help="build optional external tools (llama.cpp's CPU tools) and show their status")
    actions = parser.add_subparsers(dest="action", required=True)
    build = actions.add_parser("llama-cpp", help="download and build llama-quantize, -imatrix, -bench and -perplexity "
                               "(CPU, about half an hour on two cores; a finished build is reused)")
    build.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                       help="parallel compile jobs (default: all cores)")
    build.add_argument("--nice", action="store_true", help="compile at the lowest CPU priority")
    build.add_argument("--json", action="store_true", help="print the built tools as JSON")
    status = actions.add_parser("status", help="say which tools are built and where")
    status.add_argument("--json", action="store_true")
    parser.set_defaults(run=run)


def run(args) -> int:
    from shrink_core.perf import llamacpp

    home = llamacpp.default_home()
    if args.action == "status":
        tools = llamacpp.find_tools(home)
        if args.json:
            print_json({"llama.cpp": tools.to_dict() if tools else None})
        elif tools:
            print(f"llama.cpp {tools.build_id} from {llamacpp.SDIST_NAME} {tools.version}: built in {tools.root}")
        else:
            print(f"llama.cpp: not built; build it with `{llamacpp.BUILD_COMMAND}`")
        return 0
    if args.jobs < 1:
        raise ShrinkError(f"--jobs must be at least 1, not {args.jobs}.")
    last = [None]

    def progress(fraction: float, message: str) -> None:
        line = f"[{fraction:4.0%}] {message}"
        if not args.json and line != last[0]:
            last[0] = line
            print(f"\r{line[:100]:<100}", end="", file=sys.stderr, flush=True)

    tools = llamacpp.build_tools(home, progress, jobs=args.jobs, nice=args.nice)
    if not args.json:
        print(file=sys.stderr)
    if args.json:
        print_json(tools.to_dict())
    else:
        paths = (tools.quantize, tools.imatrix, tools.bench, tools.perplexity)
        print(f"llama.cpp {tools.build_id}: {', '.join(str(p) for p in paths)}")
    return 0
