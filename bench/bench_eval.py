"""Evaluation throughput vs the raw forward pass over the same windows, and the end-to-end `eval` time.

    .venv/bin/python bench/bench_eval.py [--model builtin:smollm2-135m] [--slices en,fr] [--budget fast]

Prints one JSON line. Run on an idle machine: figures are wall-clock on this CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def raw_forward_seconds(model, requests, max_tokens: int) -> float:
    """The same batches as the evaluator, through model(...) with full logits and nothing else."""
    import torch

    from shrink_core.evaluation.evaluate import _batches

    started = time.perf_counter()
    with torch.inference_mode():
        for batch in _batches(requests, max_tokens):
            width = max(len(requests[i].ids) for i in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, index in enumerate(batch):
                ids[row, : len(requests[index].ids)] = torch.tensor(requests[index].ids)
                mask[row, : len(requests[index].ids)] = 1
            model(input_ids=ids, attention_mask=mask)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--slices", default="en,fr")
    parser.add_argument("--budget", default="fast")
    args = parser.parse_args()
    import torch

    from shrink_core.evaluation.evaluate import evaluate_slice, get_protocol, select_items, text_requests
    from shrink_core.evaluation.slices import get_slice, load_rows
    from shrink_core.model.load import load

    load_started = time.perf_counter()
    loaded = load(args.model)
    load_s = time.perf_counter() - load_started
    budget = get_protocol(args.budget)
    figures = {"model": args.model, "budget": args.budget, "threads": torch.get_num_threads(), "load_s": round(load_s, 2)}
    raw_total = eval_total = tokens_total = 0.0
    for slice_id in args.slices.split(","):
        info = get_slice(slice_id)
        rows = select_items(load_rows(info), budget.text_rows, by_group=True)
        requests = text_requests(loaded.tokenizer, rows, budget.window)
        raw_forward_seconds(loaded.model, requests[:8], budget.max_batch_tokens)  # warm-up
        raw = raw_forward_seconds(loaded.model, requests, budget.max_batch_tokens)
        started = time.perf_counter()
        result = evaluate_slice(loaded.model, loaded.tokenizer, info, budget)
        evaluated = time.perf_counter() - started
        tokens = sum(len(r.ids) for r in requests)
        figures[slice_id] = {"tokens": tokens, "raw_forward_tok_s": round(tokens / raw, 1),
                             "eval_tok_s": round(tokens / evaluated, 1), "ppl": round(result.ppl, 4)}
        raw_total += raw
        eval_total += evaluated
        tokens_total += tokens
    figures["raw_forward_tok_s"] = round(tokens_total / raw_total, 1)
    figures["eval_tok_s"] = round(tokens_total / eval_total, 1)
    figures["eval_over_raw"] = round(raw_total / eval_total, 3)
    del loaded
    # A fresh store, so the CLI cannot reuse stored reference results; the fp32 model cache is shared (cached model).
    from shrink_core.paths import model_cache_dir

    env = dict(os.environ, SHRINK_HOME=tempfile.mkdtemp(), SHRINK_MODEL_CACHE=str(model_cache_dir()))
    started = time.perf_counter()
    cli = subprocess.run([sys.executable, "-m", "shrink_core", "eval", "--model", args.model, "--slices", args.slices,
                          "--protocol", args.budget, "--json"], capture_output=True, text=True, env=env)
    figures["cli_eval_s"] = round(time.perf_counter() - started, 2)
    figures["cli_ok"] = cli.returncode == 0
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
