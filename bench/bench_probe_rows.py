"""Do the closed loop's probe rows rank plans as the eval rows do? Each plan applied once, KL on four row sets.

  python bench/bench_probe_rows.py --plan A.yaml --plan B.yaml ... [--slices en,fr,zh,code,arith] --out DIR

Why: the closed loop (`sensitivity/loop.py`, measure_on "probe") judges each round on each slice's calibration rows at
the fast scan depth (8 x 128 tokens), and only the kept plan is then run on eval rows. Run by gptq-seq at W3 g64's
bytes (bench_seqloop.py, 2026-12-07), its rounds measured within 2.5% of uniform w3g32-log8 on those rows, where the
planner's plan measures 15% below it on 8 x 512 eval tokens. The rows differ in two ways: which text (calibration
rows, which gptq-seq's recipe also draws from, against eval rows) and how long a window (128 against 512 tokens).
Each plan here is applied once (`plan_candidate`: its method and recipe, as the loop and "Run this plan" apply it)
and measured against the reference on:
- calib128: the loop's probe rows (`calib_tokens`, 8 x 128);
- calib512: the same slice's calibration rows in 8 windows of 512;
- eval128: the first 4,096 eval tokens (`eval_tokens`) in 32 windows of 128;
- eval512: the same tokens in 8 windows of 512 (bench_peers' rows at --windows 8).
So eval128 against eval512 is the window length alone, and calib512 against eval512 the text alone.
Writes DIR/probe_rows.jsonl: per plan, its apply seconds and KL per (row set, slice), with the load average;
each row set's seconds. Peak memory: the plans' copies and one slice's references of one row set.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_peers import emit as emit_line  # noqa: E402

ROW_SETS = {"calib128": ("calib", 8, 128), "calib512": ("calib", 8, 512), "eval128": ("eval", 32, 128),
            "eval512": ("eval", 8, 512)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--plan", action="append", required=True, metavar="PLAN_YAML")
    parser.add_argument("--slices", default="en,fr,zh,code,arith")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from shrink_core.model.load import load
    from shrink_core.plan import load_plan
    from shrink_core.results.eval_run import plan_candidate
    from shrink_core.sensitivity.probe import ProbeCache, calib_tokens, eval_tokens, whole_model_kl

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handle = (out / "probe_rows.jsonl").open("w")
    emit = partial(emit_line, handle=handle)  # one JSON line, with the load average, printed and written
    slices = args.slices.split(",")
    loaded = load(args.model)
    emit({"part": "setup", "model": args.model, "weights_hash": loaded.weights_hash, "slices": slices,
          "row_sets": {k: f"{v[0]} rows, {v[1]} x {v[2]}" for k, v in ROW_SETS.items()}})
    # every plan applied first (a 135M copy is 0.5 GB), then one slice's references of one row set at a time: all
    # of them at once (full-vocabulary log-probs and every block's inputs) took 19 GB
    models, applied = {}, {}
    for path in args.plan:
        t0 = time.perf_counter()
        models[path] = plan_candidate(loaded, load_plan(Path(path).read_text()))[0].eval()
        applied[path] = round(time.perf_counter() - t0, 1)
        emit({"part": "applied", "plan": path, "seconds": applied[path]})
    kl: dict[str, dict] = {path: {} for path in args.plan}
    for name, (split, n, length) in ROW_SETS.items():
        t0 = time.perf_counter()
        tokens = calib_tokens if split == "calib" else eval_tokens
        for s in slices:
            cache = ProbeCache(loaded.model, tokens(loaded.tokenizer, s, n, length), chunk=4)
            for path, model in models.items():
                kl[path].setdefault(name, {})[s] = round(whole_model_kl(cache, model).kl, 5)
            del cache
        emit({"part": "row-set", "rows": name, "seconds": round(time.perf_counter() - t0, 1)})
    for path in args.plan:
        emit({"part": "plan", "plan": path, "apply_seconds": applied[path], "kl": kl[path],
              "worst": {name: max(values.values()) for name, values in kl[path].items()}})
    handle.close()


if __name__ == "__main__":
    main()
