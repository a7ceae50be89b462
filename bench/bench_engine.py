"""Compression-engine benchmark on a real model: prints one JSON line of figures.

  python bench/bench_engine.py [--model builtin:smollm2-135m] [--parts quant,prune,bytes,speed] [--windows 4]

Perplexity: the first `--windows` windows of 512 tokens of each slice's split=="eval" text (evalsets/data), batched,
torch.inference_mode. Calibration: split=="calib" rows (recipe printed with the figures).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from shrink_core.compression.apply import apply_plan_  # noqa: E402
from shrink_core.evaluation.calibration import CalibrationRecipe, calibration_tokens, slice_texts  # noqa: E402
from shrink_core.model.load import load  # noqa: E402
from shrink_core.plan import load_plan  # noqa: E402

SLICES = ("en", "fr", "de", "es", "ru", "zh", "ja", "ar")
LINEARS = "[q, k, v, o, gate, up, down]"


def plan_text(weights: str = "", prune: str = "") -> str:
    body = ", ".join(p for p in (f"weights: {weights}" if weights else "", f"prune: {prune}" if prune else "") if p)
    return f"version: 1\nrules:\n  - {{kind: {LINEARS}, {body}}}\n"


def eval_windows(tokenizer, slice_name: str, windows: int, seq_len: int = 512) -> torch.Tensor:
    texts = slice_texts(slice_name, "eval")
    stream: list[int] = []
    for text in texts:  # file order, no shuffle: a fixed set
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= windows * seq_len:
            break
    return torch.tensor(stream[: windows * seq_len]).reshape(windows, seq_len)


def perplexity(model, windows: torch.Tensor, batch_size: int = 4) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in windows.split(batch_size):
            logits = model(batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum")
            total, count = total + float(loss), count + batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(total / count)))


def forward_seconds(model, tokens: torch.Tensor, runs: int = 5) -> float:
    times = []
    with torch.inference_mode():
        model(tokens)
        for _ in range(runs):
            start = time.perf_counter()
            model(tokens)
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--parts", default="quant,prune,bytes,speed")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--slices", default=",".join(SLICES))
    parser.add_argument("--calib-n", type=int, default=32)
    parser.add_argument("--calib-len", type=int, default=512)
    parser.add_argument("--mix", default="en=1", help="calibration mix, e.g. en=0.3,fr=0.1,... (shares)")
    parser.add_argument("--skip-base", action="store_true", help="skip the reference perplexities")
    parser.add_argument("--quant-methods", default="rtn,gptq", help="which w4g64 methods to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    loaded = load(args.model)
    base, tokenizer = loaded.model, loaded.tokenizer
    slices = [s for s in args.slices.split(",") if (Path("evalsets/data") / f"{s}.jsonl.gz").is_file()]
    windows = {s: eval_windows(tokenizer, s, args.windows) for s in slices}
    mix = {k: float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    recipe = {"mix": mix, "n_sequences": args.calib_n, "seq_len": args.calib_len, "seed": 0}
    methods = args.quant_methods.split(",")
    calibration = calibration_tokens(tokenizer, CalibrationRecipe.from_dict(recipe))
    figures = {"model": args.model, "torch_threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(),
               "eval": f"{args.windows}x512 tokens "
               "of split=eval per slice", "calibration": {**recipe, "n_sequences": int(calibration.shape[0])}}
    if not args.skip_base:
        figures["ppl_base"] = {s: round(perplexity(base, w), 3) for s, w in windows.items()}

    def run(text: str, slice_names, calib=calibration):
        model = copy.deepcopy(base)
        report = apply_plan_(model, load_plan(text), calib)
        return model, report, {s: round(perplexity(model, windows[s]), 3) for s in slice_names}

    if "quant" in parts or "bytes" in parts:
        reports = {}
        for method in methods:
            model, reports[method], figures[f"ppl_{method}_w4g64"] = run(
                plan_text(f"{{bits: 4, group_size: 64, method: {method}}}"), slices)
            figures[f"seconds_{method}_w4g64"] = round(reports[method].timings["total_s"], 2)
            figures[f"cpu_seconds_{method}_w4g64"] = round(reports[method].timings["total_cpu_s"], 2)
            figures[f"packed_bytes_{method}_w4g64"] = reports[method].totals["total_packed_bytes"]
            if "bytes" in parts and method == methods[-1]:
                from shrink_core.compression.export import write_packed_artifact

                with tempfile.TemporaryDirectory() as tmp:
                    size = write_packed_artifact(model, reports[method], Path(tmp) / "packed.safetensors")
                predicted = reports[method].totals["total_packed_bytes"]
                figures["packed_accounting"] = {"method": method, "predicted_bytes": predicted,
                                                "artifact_file_bytes": size,
                                                "relative_difference": round((size - predicted) / size, 5)}
            del model
        if set(methods) >= {"rtn", "gptq"}:
            base_ppl = figures["ppl_base"]
            figures["increase_ratio_gptq_over_rtn"] = {
                s: round((figures["ppl_gptq_w4g64"][s] - base_ppl[s]) / (figures["ppl_rtn_w4g64"][s] - base_ppl[s]), 3)
                for s in slices}
    if "prune" in parts:
        _, report, figures["ppl_magnitude50"] = run(plan_text(prune="{structure: unstructured, amount: 0.5}"), ["en"])
        _, report, figures["ppl_sparsegpt50"] = run(
            plan_text(prune="{structure: unstructured, amount: 0.5, criterion: sparsegpt}"), ["en"])
        figures["seconds_sparsegpt50"] = round(report.timings["total_s"], 2)
        figures["cpu_seconds_sparsegpt50"] = round(report.timings["total_cpu_s"], 2)
        _, report, figures["ppl_wanda50"] = run(
            plan_text(prune="{structure: unstructured, amount: 0.5, criterion: wanda}"), ["en"])
    if "speed" in parts:
        tokens = windows["en"][:1]
        model, report, figures["ppl_mlp50"] = run("preset:mlp50", ["en"])
        before, after = [], []
        for _ in range(5):  # interleaved, so both see the same load on a shared machine
            before.append(forward_seconds(base, tokens, runs=2))
            after.append(forward_seconds(model, tokens, runs=2))
        before, after = min(before), min(after)
        figures["forward_512_s"] = {"base": round(before, 4), "mlp50": round(after, 4),
                                    "reduction": round(1 - after / before, 3), "device": "cpu", "runs": 10,
                                    "statistic": "min, interleaved"}
        figures["params_mlp50"] = sum(p.numel() for p in model.parameters())
    figures["load_average_at_end"] = os.getloadavg()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
