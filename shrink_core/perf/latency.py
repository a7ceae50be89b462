"""Measured latency on this machine: prefill and decode time per token, interleaved across candidates.

The only timing code of the library. Candidates are measured round-robin in one loop (run 1 of every candidate, then
run 2, ...), so a burst of load from other processes hits all of them alike; each figure keeps its samples and spread.
Definitions: prefill ms/token = prefill wall time / (batch * prompt tokens); decode ms/token = wall time of one decode
step (every sequence of the batch gains one token), averaged over the decode steps of a run.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass

NOISY_SPREAD = 0.10  # a figure whose (max - min) / median exceeds this is flagged noisy


@dataclass(frozen=True)
class Timing:
    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> float:
        """(max - min) / median over the runs."""
        return (max(self.samples_ms) - min(self.samples_ms)) / self.median_ms if self.median_ms else 0.0

    def to_dict(self) -> dict:
        return {"median_ms": round(self.median_ms, 4), "min_ms": round(min(self.samples_ms), 4),
                "max_ms": round(max(self.samples_ms), 4), "spread": round(self.spread, 4),
                "noisy": self.spread > NOISY_SPREAD, "samples_ms": [round(s, 4) for s in self.samples_ms]}


@dataclass(frozen=True)
class MeasuredLatency:
    candidate: str
    device: str
    runtime: str
    threads: int
    batch: int
    prompt_tokens: int
    decode_tokens: int
    runs: int
    warmup: int
    prefill_ms_per_token: Timing
    decode_ms_per_token: Timing
    load_average: tuple[float, float]  # 1-minute load average before and after the whole measurement

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000 * self.batch / self.decode_ms_per_token.median_ms

    @property
    def prefill_tokens_per_s(self) -> float:
        return 1000 / self.prefill_ms_per_token.median_ms

    def to_dict(self) -> dict:
        return {
            "kind": "measured", "candidate": self.candidate, "device": self.device, "runtime": self.runtime,
            "threads": self.threads, "batch": self.batch, "prompt_tokens": self.prompt_tokens,
            "decode_tokens": self.decode_tokens, "runs": self.runs, "warmup": self.warmup,
            "prefill_ms_per_token": self.prefill_ms_per_token.to_dict(),
            "decode_ms_per_token": self.decode_ms_per_token.to_dict(),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "load_average": list(self.load_average),
        }


def device_name() -> str:
    """CPU model and core count of this machine."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            model = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores (cpu)"


def _load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else -1.0


def one_run(model, batch: int, prompt_tokens: int, decode_tokens: int, vocab: int, seed: int) -> tuple[float, float]:
    """(prefill ms/token, decode ms/token) of one prompt + greedy decode."""
    import torch
    from transformers import DynamicCache

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=generator)  # (batch, prompt)
    cache = DynamicCache()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)  # (batch, 1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        decode = time.perf_counter() - start
    return 1000 * prefill / (batch * prompt_tokens), 1000 * decode / decode_tokens


def measure_latency(candidates: dict, runtimes: dict | None = None, batches: tuple[int, ...] = (1, 4),
                    prompt_tokens: int = 64, decode_tokens: int = 16, runs: int = 5, warmup: int = 1,
                    threads: int | None = None) -> list[MeasuredLatency]:
    """Measure every candidate (name -> model) at every batch size, interleaved; one MeasuredLatency per pair.

    runtimes: name -> runtime label (default "pytorch-eager <dtype>"). threads: torch intra-op threads for the
    measurement (restored afterwards); None keeps the current setting.
    """
    return _measure(candidates, runtimes, batches, prompt_tokens, decode_tokens, runs, warmup, threads, None)[0]


def measure_with_probes(candidates: dict, probe_model, runtimes: dict | None = None, batches: tuple[int, ...] = (1, 4),
                        prompt_tokens: int = 64, decode_tokens: int = 16, runs: int = 5, warmup: int = 1,
                        threads: int | None = None):
    """As `measure_latency`, plus two machine probes in every round of the loop (so they see the same load as the
    latencies): a GEMV pass over `probe_model`'s linear weights (bandwidth) and a decode step of a same-depth toy
    with tiny widths (per-step overhead). Returns (list[MeasuredLatency], Bandwidth, StepOverhead)."""
    return _measure(candidates, runtimes, batches, prompt_tokens, decode_tokens, runs, warmup, threads, probe_model)


def _measure(candidates, runtimes, batches, prompt_tokens, decode_tokens, runs, warmup, threads, probe_model):
    import torch

    if runs < 1 or warmup < 0 or prompt_tokens < 1 or decode_tokens < 1:
        raise ValueError("runs, prompt_tokens and decode_tokens must be >= 1 and warmup >= 0.")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    load_before = _load()
    samples = {(name, b): ([], []) for name in candidates for b in batches}
    probe = _GemvProbe(probe_model) if probe_model is not None else None
    toy = same_depth_toy(probe_model) if probe_model is not None else None
    bandwidth_samples, overhead_samples = [], []
    try:
        for index in range(warmup + runs):
            for batch in batches:
                for name, model in candidates.items():
                    vocab = model.config.get_text_config().vocab_size
                    prefill, decode = one_run(model, batch, prompt_tokens, decode_tokens, vocab, seed=index)
                    if index >= warmup:
                        samples[(name, batch)][0].append(prefill)
                        samples[(name, batch)][1].append(decode)
            if probe is not None:
                gb_per_s = probe.run()
                _, step_ms = one_run(toy, 1, 8, decode_tokens, toy.config.vocab_size, seed=index)
                if index >= warmup:
                    bandwidth_samples.append(gb_per_s)
                    overhead_samples.append(step_ms)
    finally:
        torch.set_num_threads(previous)
    load = (load_before, _load())
    device = device_name()
    labels = runtimes or {}
    results = []
    for (name, batch), (prefill, decode) in samples.items():
        dtype = str(next(candidates[name].parameters()).dtype).replace("torch.", "")
        results.append(MeasuredLatency(
            candidate=name, device=device, runtime=labels.get(name, f"pytorch-eager {dtype} (torch {torch.__version__})"),
            threads=used, batch=batch, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, runs=runs,
            warmup=warmup, prefill_ms_per_token=Timing(tuple(prefill)), decode_ms_per_token=Timing(tuple(decode)),
            load_average=load,
        ))
    if probe is None:
        return results, None, None
    bandwidth = Bandwidth(tuple(bandwidth_samples), probe.bytes, probe.what + ", interleaved with the latency runs",
                          used, device)
    layers = toy.config.num_hidden_layers
    return results, bandwidth, StepOverhead(Timing(tuple(overhead_samples)), layers, used, device)


@dataclass(frozen=True)
class Bandwidth:
    """Achieved memory bandwidth of batch-1 matrix-vector products over weights far larger than the caches."""

    samples_gb_per_s: tuple[float, ...]
    matrix_bytes: int
    what: str
    threads: int
    device: str

    @property
    def bytes_per_s(self) -> float:
        return 1e9 * statistics.median(self.samples_gb_per_s)

    def to_dict(self) -> dict:
        median = statistics.median(self.samples_gb_per_s)
        return {"kind": "measured", "what": self.what, "device": self.device, "threads": self.threads,
                "bytes_read": self.matrix_bytes, "median_GB_per_s": round(median, 2),
                "spread": round((max(self.samples_gb_per_s) - min(self.samples_gb_per_s)) / median, 4),
                "runs": len(self.samples_gb_per_s)}


@dataclass(frozen=True)
class StepOverhead:
    """Decode step time of a toy with the reference's depth and tiny widths: what a step costs beyond its bytes and FLOPs."""

    step_ms: Timing
    layers: int
    threads: int
    device: str

    def to_dict(self) -> dict:
        return {"kind": "measured", "what": f"batch-1 decode step of a {self.layers}-block toy (hidden 64, vocab 256), "
                "interleaved with the latency runs", "device": self.device, "threads": self.threads,
                "step_ms": self.step_ms.to_dict()}


def same_depth_toy(model):
    """A randomly initialised model with `model`'s architecture and depth but tiny widths (its cost is overhead)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config.get_text_config())
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "head_dim": 16, "vocab_size": 256})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


class _GemvProbe:
    """One timed pass of batch-1 GEMVs over a model's linear weights, or over one large fp32 matrix."""

    def __init__(self, model=None, matrix_bytes: int = 256 * 1024**2):
        import torch

        if model is not None:
            self.weights = [m.weight for m in model.modules()
                            if isinstance(m, torch.nn.Linear) and m.weight.is_floating_point()]
            self.what = f"batch-1 GEMV over the model's {len(self.weights)} linear weights"
        else:
            self.weights = [torch.randn(matrix_bytes // (4 * 4096), 4096)]  # (rows, 4096)
            self.what = "fp32 GEMV over one matrix larger than the caches"
        self.inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype) for w in self.weights}
        self.bytes = sum(w.numel() * w.element_size() for w in self.weights)

    def run(self) -> float:
        """GB/s of one pass."""
        import torch

        with torch.inference_mode():
            start = time.perf_counter()
            for weight in self.weights:
                torch.nn.functional.linear(self.inputs[weight.shape[1]], weight)
            return self.bytes / (time.perf_counter() - start) / 1e9


def measure_bandwidth(model=None, runs: int = 5, threads: int | None = None,
                      matrix_bytes: int = 256 * 1024**2) -> Bandwidth:
    """Time batch-1 GEMVs `runs` times (after one warm-up pass): over every linear weight of `model` (the matrices a
    decode step reads) or, without a model, over one fp32 matrix of `matrix_bytes`."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    probe = _GemvProbe(model, matrix_bytes)
    try:
        samples = [probe.run() for _ in range(runs + 1)][1:]
    finally:
        torch.set_num_threads(previous)
    return Bandwidth(tuple(samples), probe.bytes, probe.what, used, device_name())
