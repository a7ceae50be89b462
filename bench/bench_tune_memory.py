"""Peak memory of a plan's end-to-end tuning (`tune: scales`) against the memory model's prediction.

  python bench/bench_tune_memory.py [--model builtin:smollm2-135m] [--steps 3] [--sequences 8]

Applies int3 g64 RTN with `tune: {steps, holdout: 2}` beside an unquantized reference (as the Plan page's runs do)
and samples the process's RSS every 20 ms, per phase: before applying (both models resident), quantizing, and tuning
(from the call of tune_scales_). Prints one JSON line: each phase's peak in GB, the tuning phase's peak above the
resident models, and perf/footprint.py's tuning_phase parts for the same shapes. Memory, not time: it may run beside
other work.
"""
from __future__ import annotations

import argparse
import copy
import json
import threading
import time


def rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=8)
    args = parser.parse_args()

    import shrink_core.compression.apply as apply_module
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.model.load import load
    from shrink_core.perf import footprint
    from shrink_core.plan import load_plan

    phase, peaks = {"name": "load"}, {}

    def sample() -> None:
        while True:
            peaks[phase["name"]] = max(peaks.get(phase["name"], 0), rss())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    loaded = load(args.model)
    reference = loaded.model.eval()
    model = copy.deepcopy(reference)
    plan = load_plan(f"version: 1\ncalibration: {{mix: {{en: 1}}, n_sequences: {args.sequences}, seq_len: 512}}\n"
                     f"tune: {{steps: {args.steps}, holdout: 2}}\nrules:\n"
                     "- {kind: [q, k, v, o, gate, up, down], weights: {bits: 3, group_size: 64, method: rtn}}\n")
    tokens, _ = plan_calibration(plan, loaded.tokenizer)
    tune = apply_module.tune_scales_

    def marked(*a, **k):
        phase["name"] = "tune"
        return tune(*a, **k)

    apply_module.tune_scales_ = marked  # the phase starts where the tuning does
    time.sleep(0.1)
    peaks["resident"] = rss()
    phase["name"] = "quantize"
    report = apply_module.apply_plan_(model, plan, tokens, reference=reference)
    time.sleep(0.1)
    facts = footprint.facts_from_model(reference)
    predicted = footprint.tuning_phase(facts, plan.tune.batch, 512)
    print(json.dumps({"model": args.model, "peaks_gb": {k: round(v / 1e9, 3) for k, v in peaks.items()},
                      "tuning_above_resident_gb": round((peaks["tune"] - peaks["resident"]) / 1e9, 3),
                      "predicted_gb": {k: round(v / 1e9, 3) for k, v in predicted.items()},
                      "predicted_total_gb": round(sum(predicted.values()) / 1e9, 3),
                      "tuned_modules": report.tuning["modules"], "steps": args.steps}))


if __name__ == "__main__":
    main()
