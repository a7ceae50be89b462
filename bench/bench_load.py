"""First (GGUF -> fp32 cache) and cached load times of the built-in models, as a user pays them.

    .venv/bin/python bench/bench_load.py [--models smollm2-135m,gemma3-270m]

Each load runs `python -m shrink_core inspect --json` in a fresh process against an empty model cache, then again
from the cache. Prints one JSON line: wall seconds per call (process start + imports + load) and the load itself.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def inspect(spec: str, env: dict) -> dict:
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "shrink_core", "inspect", "--model", spec, "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    report = json.loads(out.stdout)
    return {"wall_s": round(wall, 2), "load_s": report["load_seconds"], "from_cache": report["from_cache"],
            "parameters": report["summary"]["parameters"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    args = parser.parse_args()
    figures = {"loadavg_1m": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as home:
        env = dict(os.environ, SHRINK_HOME=home, HF_HUB_OFFLINE="1")
        env.pop("SHRINK_MODEL_CACHE", None)
        for name in args.models.split(","):
            spec = f"builtin:{name}"
            figures[name] = {"first": inspect(spec, env), "cached": inspect(spec, env)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
