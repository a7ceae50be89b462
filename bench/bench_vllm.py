"""Serve an exported compressed-tensors directory with vLLM (offline `LLM` API) and measure its speed.

    python bench/bench_vllm.py EXPORT_DIR [--prompts 64] [--max-tokens 128] [--dtype float16] [--out FILE]
    python bench/bench_vllm.py EXPORT_DIR --build preset:w8 [--model builtin:smollm2-135m]   # export first (CPU)

EXPORT_DIR is what `shrink_core.compression.ct_export.write_compressed_tensors` wrote (--build writes it first:
the model with the plan applied, rtn/gptq as the plan says). Prints one JSON line:
- throughput: a fixed set of prompts (the same eight, cycled) generated in one batch, greedy, `ignore_eos` so every
  request yields exactly --max-tokens tokens: output tokens/s and prompt+output tokens/s;
- latency per token at batch 1: for a few prompts, the time of a 1-token request (prefill and the first token)
  and of a --max-tokens request; (long - short) / (max_tokens - 1) is the decode time per token. The medians are
  reported, with every sample;
- the first completion's text, as a sanity check that the weights decode to sense.
Run it once on the export and once on a float baseline directory (e.g. a saved candidate without quantization)
to compare. --dtype defaults to float16: vLLM's W4A16 / W8A16 kernels want float16 or bfloat16 activations (the
built-in models' configs say float32), and float16 holds the export's float16 scales exactly.

It needs a CUDA GPU and vLLM (not in requirements.txt: a multi-GB install pinned to its own torch), so it is run
by hand on a machine that has both, never by the test suite; without either it says which is missing and exits 2.
If vLLM refuses the export (e.g. no kernel for a layer's shape), its message is printed and the exit code is 1.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "def fibonacci(n):",
    "List three uses of a paperclip:",
    "Translate to German: The weather is nice today.",
    "Once upon a time, in a small village,",
    "What is 17 times 23? Answer:",
]


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:500]}"


def environment_problem() -> str | None:
    """Why this machine cannot run the bench, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed; install it on a CUDA machine (pip install vllm) to run this bench."
    import torch

    if not torch.cuda.is_available():
        return "No CUDA GPU is visible; vLLM's W4A16 / W8A16 kernels need one, so run this bench on a GPU machine."
    return None


def schemes(export_dir: Path) -> dict[str, int]:
    """'W4A16 g64 asym' -> module count, from the export's quantization_config."""
    config = json.loads((export_dir / "config.json").read_text()).get("quantization_config") or {}
    out = {}
    for group in config.get("config_groups", {}).values():
        w = group["weights"]
        size = "channel" if w.get("group_size") is None else f"g{w['group_size']}"
        out[f"W{w['num_bits']}A16 {size} {'sym' if w['symmetric'] else 'asym'}"] = len(group["targets"])
    return out


def timed_generate(llm, prompts: list[str], params) -> tuple[float, list]:
    started = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - started, outputs


def measure(llm, args) -> dict:
    from vllm import SamplingParams

    def greedy(tokens: int):
        return SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True, seed=0)

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    timed_generate(llm, prompts[:4], greedy(8))  # warm-up: kernels, CUDA graphs, allocator
    seconds, outputs = timed_generate(llm, prompts, greedy(args.max_tokens))
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    prefill_ms, per_token_ms = [], []
    for prompt in PROMPTS[:args.latency_requests]:
        short, _ = timed_generate(llm, [prompt], greedy(1))
        long, _ = timed_generate(llm, [prompt], greedy(args.max_tokens))
        prefill_ms.append(1000 * short)
        per_token_ms.append(1000 * (long - short) / max(args.max_tokens - 1, 1))
    return {
        "throughput": {"requests": len(prompts), "seconds": round(seconds, 3), "output_tokens": generated,
                       "output_tokens_per_s": round(generated / seconds, 1),
                       "total_tokens_per_s": round((generated + prompt_tokens) / seconds, 1)},
        "latency_batch1": {"first_token_ms_median": round(statistics.median(prefill_ms), 2),
                           "per_token_ms_median": round(statistics.median(per_token_ms), 3),
                           "per_token_ms": [round(x, 3) for x in per_token_ms]},
        "sample": {"prompt": outputs[0].prompt, "text": outputs[0].outputs[0].text[:300]},
    }


def build_export(model_spec: str, plan_spec: str, export_dir: Path) -> None:
    """Apply `plan_spec` to `model_spec` and write the compressed-tensors directory (the engine's own path)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from shrink_core.compression.apply import apply_plan_
    from shrink_core.compression.ct_export import write_compressed_tensors
    from shrink_core.evaluation.calibration import plan_calibration
    from shrink_core.model.load import load
    from shrink_core.plan import load_plan

    loaded, plan = load(model_spec), load_plan(plan_spec)
    calibration, recipe = plan_calibration(plan, loaded.tokenizer)
    report = apply_plan_(loaded.model, plan, calibration, recipe=recipe)
    write_compressed_tensors(loaded.model, loaded.tokenizer, report, export_dir,
                             {"model_spec": model_spec, "plan": plan_spec})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", type=Path, help="a directory written by write_compressed_tensors")
    parser.add_argument("--prompts", type=int, default=64, help="requests in the throughput batch")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    parser.add_argument("--latency-requests", type=int, default=5, help="batch-1 requests timed for latency")
    parser.add_argument("--dtype", default="float16", help="activation dtype (float16 or bfloat16)")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (slower; for debugging)")
    parser.add_argument("--out", type=Path, help="also append the JSON line to this file")
    parser.add_argument("--build", metavar="PLAN", help="first write EXPORT_DIR: this plan applied to --model")
    parser.add_argument("--model", default="builtin:smollm2-135m", help="the model --build compresses")
    args = parser.parse_args(argv)
    if args.build:
        build_export(args.model, args.build, args.export_dir)
    if not (args.export_dir / "config.json").is_file():
        print(f"{args.export_dir} has no config.json; pass a directory written by write_compressed_tensors.",
              file=sys.stderr)
        return 2
    problem = environment_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch
    import vllm

    try:
        llm = vllm.LLM(model=str(args.export_dir), dtype=args.dtype, max_model_len=args.max_model_len,
                       gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager, seed=0)
    except Exception as exc:  # vLLM's own message says what it refused (kernel, shape, scheme)
        print(f"vLLM could not load {args.export_dir}: {first_line(exc)}", file=sys.stderr)
        return 1
    line = {"bench": "vllm", "export_dir": str(args.export_dir), "vllm": vllm.__version__,
            "gpu": torch.cuda.get_device_name(0), "dtype": args.dtype, "schemes": schemes(args.export_dir),
            "max_tokens": args.max_tokens, **measure(llm, args)}
    text = json.dumps(line)
    print(text, flush=True)
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
