"""The time of one plan's whole quantization (`apply_plan_`) on a model, and a hash of every weight it leaves, so that
a speed change can show it changes nothing else.

  python bench/bench_apply_time.py --plan PLAN.yaml [--model builtin:smollm2-135m] [--profile N]

Prints one JSON line: seconds (wall and CPU) of `apply_plan_` alone (the model load and the calibration tokens are
timed apart), which shrink_core ran (path, commit), torch's thread count, the CPU, the load average before and after,
and `weights_sha256`: SHA-256 over every parameter and buffer of the model afterwards, in name order (two runs with
the same hash left bit-for-bit the same weights). --profile N adds cProfile's N costliest functions by cumulative
time to stderr. To time an older commit, run this file from a worktree of it (`git worktree add DIR COMMIT`, copy
the file there): the file puts its own checkout first on the path.
Run alone under the shared lock (`flock LOCK python bench/...`): the figure is wall time on a shared 2-core machine.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def code_version() -> dict:
    """Which shrink_core ran (a worktree of another commit is the way to time old code) and its commit."""
    import subprocess

    import shrink_core

    root = Path(shrink_core.__file__).resolve().parents[1]
    def git(*args):
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None
    status = git("status", "--porcelain", "--", "shrink_core")
    return {"shrink_core": str(root), "commit": git("rev-parse", "--short", "HEAD"),
            "shrink_core_modified": None if status is None else bool(status)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True, help="a plan file (YAML)")
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="print cProfile's N costliest functions (cumulative) to stderr")
    args = parser.parse_args()

    from shrink_core.compression.apply import apply_plan_
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.model.load import load
    from shrink_core.perf.latency import device_name
    from shrink_core.plan import load_plan

    plan = load_plan(Path(args.plan).read_text())
    started = time.perf_counter()
    loaded = load(args.model)
    model = loaded.model.eval()
    load_seconds = time.perf_counter() - started
    started = time.perf_counter()
    tokens, recipe = plan_calibration(plan, loaded.tokenizer)
    token_seconds = time.perf_counter() - started

    load_before = os.getloadavg()
    profiler = cProfile.Profile() if args.profile else None
    wall, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    report = apply_plan_(model, plan, tokens, recipe=recipe)
    if profiler:
        profiler.disable()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    load_after = os.getloadavg()
    if profiler:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(args.profile)

    print(json.dumps({
        "plan": args.plan, "model": args.model, **code_version(), "weights_hash_before": loaded.weights_hash,
        "apply_seconds": round(wall, 1), "apply_cpu_seconds": round(cpu, 1), "profiled": bool(profiler),
        "load_model_seconds": round(load_seconds, 1), "calibration_tokens_seconds": round(token_seconds, 1),
        "calibration_shape": None if tokens is None else list(tokens.shape),
        "compressed_modules": sum(1 for m in report.modules if m.bits),
        "weights_sha256": weights_sha256(model), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": device_name(), "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
    }), flush=True)


if __name__ == "__main__":
    main()
