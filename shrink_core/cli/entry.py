"""`python -m shrink_core COMMAND ...`: argument parsing and the one-sentence error contract."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import traceback

from shrink_core.errors import ShrinkError

# Modules under shrink_core/commands/, in help order.
COMMANDS = ["inspect", "eval", "slices", "sensitivity", "plan", "apply", "export", "measure", "distill", "report",
            "candidates", "sweep", "tools"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints usage + message; keep it to one clear line
        command = self.prog.replace("shrink_core", "python -m shrink_core", 1)
        self.exit(2, f"error: {message}; see `{command} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shrink_core", description="Explore how to shrink a language model without breaking it.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"shrink_core.cli.{name}").add_parser(sub)
    return parser


def stderr_progress(quiet: bool):
    """A progress callback that rewrites one line on stderr ("[ 42%] block 3 done"); silent when `quiet` (--json)."""
    def progress(fraction: float, message: str) -> None:
        if not quiet:
            print(f"\r[{fraction:5.0%}] {message:<40}", end="", file=sys.stderr, flush=True)

    return progress


def device_choice(text: str) -> str:
    """--device's value, checked as argparse checks a choice (one line naming the valid ones)."""
    from shrink_core.model.load import DEVICE_SUFFIX

    if not DEVICE_SUFFIX.match(f"x@{text}"):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device; use auto, cpu, cuda, cuda:N or mps")
    return text


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model-loading flags every command that takes --model shares."""
    parser.add_argument("--model", default="builtin:smollm2-135m", help="builtin:NAME, a directory, a .gguf file or a Hub id")
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading pickle checkpoints (runs code from the file)")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                        help="the dtype the model runs in (auto: fp32 on the CPU, bf16 on a GPU); same as a #bf16 "
                             "suffix on the spec")
    parser.add_argument("--device", default="auto", type=device_choice, metavar="{auto,cpu,cuda,cuda:N,mps}",
                        help="where the model runs (auto: a CUDA GPU where torch sees one, else the CPU); same as an "
                             "@cuda suffix on the spec")


def add_onload_arg(parser: argparse.ArgumentParser, work: str) -> None:
    parser.add_argument("--onload", default=None, type=device_choice, metavar="{cuda,cuda:N,mps}",
                        help=f"keep the model in host memory (bf16 unless --dtype says otherwise) and run each block's "
                             f"{work} on this device in turn: it holds one block and its activations, so a model "
                             "larger than the GPU runs there")


def add_executor_args(parser) -> None:
    """The executor flags every command that splits its work into units shares."""
    parser.add_argument("--executor", choices=["local", "ray"], default=None,
                        help="where the units run: local (this machine, one after another; the default, or "
                             "$SHRINK_EXECUTOR) or ray (a Ray cluster; needs `./run ray`)")
    parser.add_argument("--ray-address", default="",
                        help="the Ray cluster: host:6379, ray://host:10001 or auto (default $SHRINK_RAY_ADDRESS; "
                             "empty starts a local Ray for this command and stops it after)")
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="CPUs of a local Ray started on demand (default: all of this machine's)")
    parser.add_argument("--ray-cpus-per-unit", type=float, default=1.0, help="CPUs each unit asks Ray for")


def executor_config(args):
    from shrink_core.runtime.executors import ExecutorConfig, default_executor

    kind = args.executor or default_executor().kind
    return ExecutorConfig(kind=kind, address=args.ray_address,
                          local_cpus=args.ray_cpus if kind == "ray" else None,
                          cpus_per_unit=args.ray_cpus_per_unit)


def print_json(payload) -> None:
    json.dump(payload, sys.stdout, indent=1, default=str)
    sys.stdout.write("\n")


def print_json_line(payload) -> None:
    """One JSON object on one line, flushed: a multi-part command's `--json` streams a line per finished part and
    ends with its summary line, so a reader acts on each part as it arrives (`json.loads` of the last line is the
    whole report)."""
    sys.stdout.write(json.dumps(payload, default=str) + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model", None):
        from shrink_core.model.load import with_device, with_dtype

        # the dtype and device are part of the spec: jobs, workers and the store see them
        args.model = with_device(with_dtype(args.model, getattr(args, "dtype", "auto")), getattr(args, "device", "auto"))
    try:
        return int(args.run(args) or 0)
    except ShrinkError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the disk said no (read-only, full, missing folder): what and where, not a traceback
        if args.debug:
            traceback.print_exc()
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error: could not use{where}: {exc.strerror or exc}; check the path and its permissions.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted.", file=sys.stderr)
        return 130
