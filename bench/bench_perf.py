"""Perf bench: measured latency of the reference, a structurally pruned (mlp50) and a W4 (w4g64, packed int4 runtime)
SmolLM2 side by side, interleaved, twice; projection error of the calibrated "this machine" roofline. One JSON line.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_perf.py [--threads 1] [--runs 7] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--kernels", action="store_true",
                        help="also time SmolLM2's 210 block GEMVs: fp32, aten int4, onnxruntime MatMulNBits (if installed)")
    args = parser.parse_args()

    import torch

    from shrink_core.compression.candidate import from_plan
    from shrink_core.model.load import load
    from shrink_core.perf.hardware import get
    from shrink_core.perf.latency import measure_with_probes
    from shrink_core.perf.lowbit import lowbit_copy
    from shrink_core.perf.roofline import calibrate, launch_overhead_from_step, project, relative_error
    from shrink_core.perf.workload import describe_model

    torch.set_num_threads(args.threads)  # preparation too: 2 threads on a busy 2-core machine stall every op
    started = time.time()
    model = load(args.model).model.eval()
    pruned = from_plan(model, "preset:mlp50")
    w4 = from_plan(model, "preset:w4g64")
    w4_runnable, lowbit = lowbit_copy(w4.model, w4.bits, w4.states)
    candidates = {"reference": model, "mlp50": pruned.model, "w4g64": w4_runnable}
    runtimes = {"w4g64": lowbit.runtime}
    workloads = {"reference": describe_model(model), "mlp50": describe_model(pruned.model, name="mlp50"),
                 "w4g64": describe_model(w4.model, w4.bits, "w4g64", w4.packed)}
    batches = (1, args.batch)
    rounds, bandwidths, overheads = [], [], []
    for _ in range(args.rounds):
        measured, bandwidth, overhead = measure_with_probes(candidates, model, runtimes, batches, args.prompt_tokens,
                                                            args.decode_tokens, args.runs, 1, args.threads)
        rounds.append(measured)
        bandwidths.append(bandwidth)
        overheads.append(overhead)

    figures = {}
    for result in rounds[-1]:
        key = f"{result.candidate}_b{result.batch}"
        medians = [next(r for r in rnd if r.candidate == result.candidate and r.batch == result.batch) for rnd in rounds]
        figures[key] = {
            "prefill_ms_per_token": round(result.prefill_ms_per_token.median_ms, 4),
            "decode_ms_per_token": round(result.decode_ms_per_token.median_ms, 3),
            "prefill_spread": round(result.prefill_ms_per_token.spread, 3),
            "decode_spread": round(result.decode_ms_per_token.spread, 3),
            "decode_medians_by_round": [round(m.decode_ms_per_token.median_ms, 3) for m in medians],
            "prefill_medians_by_round": [round(m.prefill_ms_per_token.median_ms, 4) for m in medians],
        }
        for phase in ("decode", "prefill"):
            values = figures[key][f"{phase}_medians_by_round"]
            figures[key][f"{phase}_round_to_round"] = round((max(values) - min(values)) / min(values), 3)

    def paired_speedup(results, batch, phase):
        ref = next(r for r in results if r.candidate == "reference" and r.batch == batch)
        cand = next(r for r in results if r.candidate == "w4g64" and r.batch == batch)
        a = getattr(ref, f"{phase}_ms_per_token").samples_ms
        b = getattr(cand, f"{phase}_ms_per_token").samples_ms
        ratios = [x / y for x, y in zip(a, b)]
        return {"median_ratio": round(statistics.median(a) / statistics.median(b), 3),
                "paired_min": round(min(ratios), 3), "paired_max": round(max(ratios), 3)}

    reference_pairs = [(workloads["reference"], r) for r in rounds[-1] if r.candidate == "reference"]
    overhead_s = launch_overhead_from_step(overheads[-1].step_ms.median_ms / 1000, workloads["reference"])
    here = calibrate(reference_pairs, get("this-machine"), bandwidths[-1].bytes_per_s, overhead_s)
    bandwidth_only = calibrate(reference_pairs, get("this-machine"), bandwidths[-1].bytes_per_s)
    free = calibrate(reference_pairs, get("this-machine"))
    def errors_of(hardware):
        errors = {}
        for result in rounds[-1]:
            p = project(workloads[result.candidate], hardware, result.batch, args.prompt_tokens, args.decode_tokens, 32)
            errors[f"{result.candidate}_b{result.batch}"] = {
                "prefill": round(relative_error(p.prefill_ms_per_token, result.prefill_ms_per_token.median_ms), 3),
                "decode": round(relative_error(p.decode_ms_per_token, result.decode_ms_per_token.median_ms), 3),
            }
        return errors

    first = rounds[-1][0]
    print(json.dumps({
        "bench": "perf", "model": args.model, "device": first.device, "threads": first.threads,
        "runs_per_round": args.runs, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens, "load_average_by_round": [rnd[0].load_average for rnd in rounds],
        "runtimes": {name: next(r.runtime for r in rounds[-1] if r.candidate == name) for name in candidates},
        "lowbit_complete": lowbit.complete, "lowbit_not_expressed": len(lowbit.not_expressed),
        "measured": figures,
        "w4_speedup_vs_fp32_by_round": {f"b{b}_{phase}": [paired_speedup(rnd, b, phase) for rnd in rounds]
                                        for b in batches for phase in ("decode", "prefill")},
        "bandwidth_measured_by_round": [b.to_dict() for b in bandwidths],
        "step_overhead_measured_by_round": [o.to_dict()["step_ms"] for o in overheads],
        "calibrated_this_machine": {"bandwidth_GB_s": round(here.bandwidth_bytes_per_s / 1e9, 2),
                                    "fp32_GFLOP_s": round(here.peak_flops["fp32"] / 1e9, 1),
                                    "launch_overhead_us": round(here.launch_overhead_s * 1e6, 2),
                                    "overlap": here.overlap,
                                    "fitted_to": f"reference b1 and b{args.batch}, last round; bandwidth and overhead "
                                                 "measured"},
        "projection_error_here": errors_of(here),
        "projection_error_here_overhead_fitted": errors_of(bandwidth_only),
        "projection_error_here_bandwidth_fitted_too": errors_of(free),
        "kernels": kernels(args.threads) if args.kernels else None,
        "seconds": round(time.time() - started, 1),
    }))


def kernels(threads: int, runs: int = 9) -> dict:
    """Batch-1 matrix-vector products over SmolLM2's block linear shapes (53 MB of int4, 425 MB fp32), interleaved."""
    import numpy as np
    import torch

    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    x = {576: torch.randn(1, 576), 1536: torch.randn(1, 1536)}
    xb = {k: v.to(torch.bfloat16) for k, v in x.items()}
    weights = [torch.randn(n, k) for n, k in shapes]
    packed = [torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
              for n, k in shapes]
    scales = [torch.rand(k // 64, n, 2).to(torch.bfloat16) for n, k in shapes]

    def fp32():
        for w in weights:
            x[w.shape[1]] @ w.t()

    def aten_int4():
        for (_, k), p, s in zip(shapes, packed, scales):
            torch.ops.aten._weight_int4pack_mm_for_cpu(xb[k], p, 64, s)

    paths = {"fp32 eager": fp32, "aten int4 (bf16 act)": aten_int4}
    try:
        import onnxruntime
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        onnxruntime = None
    if onnxruntime is not None:
        rng = np.random.default_rng(0)
        nodes, inits, outs = [], [], []
        for i, (n, k) in enumerate(shapes):
            inits += [numpy_helper.from_array(rng.integers(0, 255, (n, k // 64, 32), dtype=np.uint8), f"B{i}"),
                      numpy_helper.from_array(rng.random(n * k // 64, dtype=np.float32), f"S{i}")]
            nodes.append(helper.make_node("MatMulNBits", [f"X{k}", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft",
                                          K=k, N=n, bits=4, block_size=64, accuracy_level=4))
            outs.append(helper.make_tensor_value_info(f"Y{i}", TensorProto.FLOAT, [1, n]))
        inputs = [helper.make_tensor_value_info(f"X{k}", TensorProto.FLOAT, [1, k]) for k in (576, 1536)]
        graph = helper.make_model(helper.make_graph(nodes, "gemv", inputs, outs, inits),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds = {f"X{k}": np.random.rand(1, k).astype(np.float32) for k in (576, 1536)}
        paths[f"onnxruntime {onnxruntime.__version__} MatMulNBits int4 (int8 compute)"] = lambda: session.run(None, feeds)
    samples = {name: [] for name in paths}
    for index in range(runs + 1):
        for name, run in paths.items():
            start = time.perf_counter()
            run()
            if index:
                samples[name].append(1000 * (time.perf_counter() - start))
    return {name: {"median_ms": round(statistics.median(v), 3), "min_ms": round(min(v), 3), "max_ms": round(max(v), 3)}
            for name, v in samples.items()}


if __name__ == "__main__":
    main()
