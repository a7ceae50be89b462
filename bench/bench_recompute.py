"""What recomputing each block in the fast scan's Fisher pass costs and saves: the pass on the built-in model with
its graph kept and with its blocks recomputed (`fisher_scores(recompute=...)`), alternating, with wall time, peak
RSS and whether the scores are the same bits.

    flock LOCK .venv/bin/python bench/bench_recompute.py [--model builtin:smollm2-135m] [--depth fast] [--repeats 2]

Prints one JSON line per run and a summary line (with the load average). Run it alone: two cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--depth", default="fast")
    parser.add_argument("--settings", default="w4g64,w3g64,w2g64,q4_k")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from shrink_core.model.load import load
    from shrink_core.perf.memory import measure_peak_rss, release_freed_memory
    from shrink_core.sensitivity import fisher
    from shrink_core.sensitivity.probe import SCAN_DEPTHS, calib_tokens
    from shrink_core.sensitivity.scan import ROBUST_CAP, ScanTargets
    from shrink_core.sensitivity.settings import get_setting

    loaded = load(args.model)
    depth = SCAN_DEPTHS[args.depth]
    modules = ScanTargets.of(loaded.model).modules
    ids = calib_tokens(loaded.tokenizer, "en", depth.calib_sequences, depth.calib_len)
    settings = [get_setting(s) for s in args.settings.split(",")]
    batch = min(depth.calib_sequences, depth.chunk * 2)  # the depth's own batch, both ways
    values, rows = {}, []
    for _ in range(args.repeats):
        for recompute in (False, True):
            release_freed_memory()
            out = {}
            started = time.perf_counter()
            peak = measure_peak_rss(lambda r=recompute, o=out: o.update(v=fisher.fisher_scores(
                loaded.model, ids, modules, settings, batch=batch, robust=ROBUST_CAP, recompute=r).values))
            row = {"model": args.model, "depth": args.depth, "tokens": int(ids.numel()), "batch": batch,
                   "recompute": recompute, "seconds": round(time.perf_counter() - started, 2),
                   "peak_rss_gb": round(peak.peak_rss_bytes / 1e9, 3), "rss_before_gb": round(peak.rss_before_bytes / 1e9, 3)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            values.setdefault(recompute, out["v"])
    print(json.dumps({"same_bits": values[False] == values[True],
                      "seconds": {str(r): [x["seconds"] for x in rows if x["recompute"] == r] for r in (False, True)},
                      "peak_rss_gb": {str(r): [x["peak_rss_gb"] for x in rows if x["recompute"] == r]
                                      for r in (False, True)},
                      "load_average": list(os.getloadavg())}))


if __name__ == "__main__":
    main()
