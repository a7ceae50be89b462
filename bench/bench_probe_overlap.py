"""How many of the scans' probe windows lie inside the text a calibration recipe draws? No model is run.

  python bench/bench_probe_overlap.py [--model builtin:smollm2-135m] [--slices en,fr,zh,code,arith] [--depth fast]
                                      [--calib-sequences 64] [--versions 2,3]

Why: the closed loop (`sensitivity/loop.py`, measure_on "probe") judges plans on each slice's probe rows
(`sensitivity/probe.calib_tokens`, the scan depth's windows of the slice's calibration rows), and a calibrated method
(gptq-seq) fits its weights to the windows its recipe draws from the same rows. A probe window inside that draw
measures the method on text it was fitted to. A window counts as inside when its first 32 tokens occur anywhere in
the drawn windows (rows run across window edges). Prints one JSON line: per recipe version and slice, how many of the
probe windows are inside, and how many tokens the recipe drew of that slice.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GRAM = 32


def main(argv=None) -> int:
    from shrink_core.evaluation.calibration import CalibrationRecipe, allocate, calibration_tokens
    from shrink_core.model.load import load
    from shrink_core.sensitivity.probe import SCAN_DEPTHS, calib_tokens

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--slices", default="en,fr,zh,code,arith")
    parser.add_argument("--depth", default="fast", choices=sorted(SCAN_DEPTHS))
    parser.add_argument("--calib-sequences", type=int, default=64, help="the recipe's windows (the presets': 64)")
    parser.add_argument("--versions", default="2,3", help="recipe versions to compare")
    args = parser.parse_args(argv)

    tokenizer = load(args.model).tokenizer
    depth = SCAN_DEPTHS[args.depth]
    slices = [s for s in args.slices.split(",") if s]
    probes = {s: calib_tokens(tokenizer, s, depth.calib_sequences, depth.calib_len).tolist() for s in slices}
    out = {"model": args.model, "depth": args.depth, "probe_windows": depth.calib_sequences,
           "probe_len": depth.calib_len, "gram": GRAM, "versions": {}}
    for version in (int(v) for v in args.versions.split(",")):
        recipe = CalibrationRecipe(n_sequences=args.calib_sequences, version=version)
        flat = [t for window in calibration_tokens(tokenizer, recipe).tolist() for t in window]
        grams = {tuple(flat[i:i + GRAM]) for i in range(len(flat) - GRAM + 1)}
        counts = allocate(recipe)
        out["versions"][version] = {
            s: {"inside": sum(tuple(w[:GRAM]) in grams for w in probes[s]),
                "recipe_tokens": counts.get(s, 0) * recipe.seq_len} for s in slices}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
