"""GPU figures that only a GPU can give: real low-bit kernel latency against bf16, and whole-model memory and speed.

    python bench/bench_gpu.py --parts env,kernels,model,train_raw --model PATH.gguf|builtin:smollm2-135m [--out FILE]

Prints one JSON line per figure (and appends it to --out), so a run cut short still leaves what it measured. Every
kernel figure is measured on the GPU named in the `env` line with CUDA events: `eager_us` is the per-call time of 50
back-to-back calls as PyTorch launches them (fewer for a slow kernel), `graph_us` the same calls replayed from a
CUDA graph (launch overhead
removed: what the kernel itself costs). The median of 5 repeats is given. Kernels tried (all shipped in PyTorch):
- bf16 dense `F.linear` (the baseline);
- int4 weight-only, `aten._weight_int4pack_mm` (tinygemm), groups of 64 and 128, codes from the engine's RTN grid;
- int8 weight-only, `aten._weight_int8pack_mm`;
- W8A8 int8, `torch._int_mm` with the per-row activation quantization counted in the time;
- W8A8 fp8 e4m3, `torch._scaled_mm` row-wise, activation cast counted in the time;
- 2:4 semi-structured sparse, `to_sparse_semi_structured` (cuSPARSELt / CUTLASS).
A kernel that is missing or refuses a shape is reported with its error, never replaced by another.
The project never needs a GPU; this bench is run by hand on a machine that has one (figures in docs/perf.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

OUT: Path | None = None

# (name, out_features, in_features): SmolLM2-135M's linears, then a Llama-3-8B-sized layer, where weights outweigh launches
SHAPES = [("smollm2.q_proj", 576, 576), ("smollm2.k_proj", 192, 576), ("smollm2.gate_proj", 1536, 576),
          ("smollm2.down_proj", 576, 1536), ("smollm2.lm_head", 49152, 576),
          ("llama8b.q_proj", 4096, 4096), ("llama8b.gate_proj", 14336, 4096), ("llama8b.down_proj", 4096, 14336)]
TOKENS = (1, 16, 256, 2048)


def emit(part: str, **figures) -> dict:
    line = {"bench": "gpu", "part": part, "utc": time.strftime("%H:%M:%S", time.gmtime()), **figures}
    text = json.dumps(line)
    print(text, flush=True)
    if OUT is not None:
        with OUT.open("a") as handle:
            handle.write(text + "\n")
    return line


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"


def timed(fn, calls: int = 50, repeats: int = 5) -> dict:
    """Per-call microseconds: eager launches, and the same calls replayed from a CUDA graph.

    A slow kernel gets fewer calls (at least 3), so one pathological kernel cannot eat the run's time box: on the
    H200 `_weight_int8pack_mm` took 74 ms a call at 2048 tokens and the first run timed out on it."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(3, min(calls, int(20.0 / max(start.elapsed_time(end), 1e-3))))  # about 20 ms of work per repeat
    eager = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        eager.append(start.elapsed_time(end) * 1000 / calls)
    result = {"eager_us": round(statistics.median(eager), 2)}
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        replays = []
        for _ in range(repeats):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            replays.append(start.elapsed_time(end) * 1000 / calls)
        result["graph_us"] = round(statistics.median(replays), 2)
    except Exception as exc:  # some kernels cannot be captured; the eager figure still stands
        result["graph_error"] = first_line(exc)
    return result


def int4_pack(weight: torch.Tensor, group: int, high_first: bool = True):
    """The engine's asymmetric RTN grid -> tinygemm's packed int4 + (groups, out, 2) bf16 scales and zeros."""
    from shrink_core.compression.primitives import quantize, scale_zero

    out, inp = weight.shape
    scale, zero = scale_zero(weight, 4, group, symmetric=False)  # (out, groups); w = (q - zero) * scale
    codes = quantize(weight, scale, zero, 4, group).to(torch.int32)  # (out, in) in [0, 15]
    even, odd = codes[:, ::2], codes[:, 1::2]
    nibbles = ((even << 4) | odd) if high_first else ((odd << 4) | even)
    tiles = next(t for t in (8, 4, 2) if inp % (t * 16) == 0)
    packed = torch.ops.aten._convert_weight_to_int4pack(nibbles.to(torch.uint8).contiguous(), tiles)
    # tinygemm computes w = (q - 8) * s + z, so z = (8 - zero) * s
    scales_zeros = torch.stack([scale.t(), ((8 - zero) * scale).t()], dim=-1).to(torch.bfloat16).contiguous()
    return packed, scales_zeros


def int4_dequant(weight: torch.Tensor, group: int) -> torch.Tensor:
    from shrink_core.compression.primitives import fake_quantize

    return fake_quantize(weight.float(), 4, group, symmetric=False)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).norm() / ref.float().norm().clamp(min=1e-12))


def kernel_variants(weight: torch.Tensor, x: torch.Tensor) -> dict:
    """name -> (callable, weight bytes, relative output error vs the bf16 product of the same rounded weights)."""
    out, inp = weight.shape
    variants: dict[str, tuple] = {}
    wb = weight.to(torch.bfloat16)
    variants["bf16"] = (lambda: F.linear(x, wb), wb.numel() * 2, 0.0)
    for group in (64, 128):
        if inp % group:
            variants[f"int4_g{group}"] = (None, None, f"in_features {inp} not divisible by group {group}")
            continue
        try:
            reference = F.linear(x, int4_dequant(weight, group).to(torch.bfloat16))
            best = None
            for high_first in (True, False):  # the nibble order of the CUDA layout, checked, not assumed
                packed, sz = int4_pack(weight, group, high_first)
                y = torch.ops.aten._weight_int4pack_mm(x, packed, group, sz)
                err = rel_error(y, reference)
                if best is None or err < best[2]:
                    best = (packed, sz, err, high_first)
            packed, sz, err, _ = best
            nbytes = out * inp // 2 + sz.numel() * 2
            variants[f"int4_g{group}"] = (lambda p=packed, s=sz, g=group: torch.ops.aten._weight_int4pack_mm(x, p, g, s),
                                          nbytes, round(err, 5))
        except Exception as exc:
            variants[f"int4_g{group}"] = (None, None, first_line(exc))
    wscale = (weight.float().abs().amax(1) / 127).clamp(min=1e-8)  # (out,)
    wq = (weight.float() / wscale[:, None]).round().clamp(-127, 127).to(torch.int8)
    ref8 = F.linear(x, (wq.float() * wscale[:, None]).to(torch.bfloat16))
    try:
        s8 = wscale.to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(x, wq, s8)
        variants["int8_weight_only"] = (lambda: torch.ops.aten._weight_int8pack_mm(x, wq, s8), wq.numel() + out * 2,
                                        round(rel_error(y, ref8), 5))
    except Exception as exc:
        variants["int8_weight_only"] = (None, None, first_line(exc))
    try:
        wq_t, ws = wq.t(), wscale[None, :]  # (in, out) column-major, as cuBLASLt wants the second operand

        def w8a8():
            xs = x.float().abs().amax(1, keepdim=True).clamp(min=1e-8) / 127
            xq = (x.float() / xs).round().clamp(-127, 127).to(torch.int8)
            return (torch._int_mm(xq, wq_t).float() * xs * ws).to(torch.bfloat16)

        variants["w8a8_int8"] = (w8a8, wq.numel() + out * 4, round(rel_error(w8a8(), ref8), 5))
    except Exception as exc:
        variants["w8a8_int8"] = (None, None, first_line(exc))
    try:
        fmax = torch.finfo(torch.float8_e4m3fn).max
        fscale = (weight.float().abs().amax(1, keepdim=True) / fmax).clamp(min=1e-12)  # (out, 1)
        wf8 = (weight.float() / fscale).to(torch.float8_e4m3fn)
        wf8_t, fs = wf8.t(), fscale.t().contiguous()  # (in, out) column-major; (1, out)

        def w8a8_fp8():
            xs = x.float().abs().amax(1, keepdim=True).clamp(min=1e-12) / fmax  # (tokens, 1)
            xf8 = (x.float() / xs).to(torch.float8_e4m3fn)
            return torch._scaled_mm(xf8, wf8_t, scale_a=xs, scale_b=fs, out_dtype=torch.bfloat16)

        reference = F.linear(x, (wf8.float() * fscale).to(torch.bfloat16))
        variants["w8a8_fp8"] = (w8a8_fp8, wf8.numel() + out * 4, round(rel_error(w8a8_fp8(), reference), 5))
    except Exception as exc:
        variants["w8a8_fp8"] = (None, None, first_line(exc))
    try:
        from torch.sparse import to_sparse_semi_structured

        groups = wb.reshape(out, inp // 4, 4)
        keep = groups.abs().topk(2, dim=-1).indices
        mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True).reshape(out, inp)
        w24 = wb * mask
        sparse = to_sparse_semi_structured(w24)
        y = F.linear(x, sparse)
        variants["sparse_2of4"] = (lambda: F.linear(x, sparse), out * inp + out * inp // 8,
                                   round(rel_error(y, F.linear(x, w24)), 5))
    except Exception as exc:
        variants["sparse_2of4"] = (None, None, first_line(exc))
    return variants


def part_env() -> None:
    props = torch.cuda.get_device_properties(0)
    emit("env", device=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda,
         multiprocessors=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
         capability=f"{props.major}.{props.minor}")


def part_kernels(shapes, tokens) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    for name, out, inp in shapes:
        weight = torch.randn(out, inp, device="cuda", generator=generator) * 0.02
        for m in tokens:
            x = torch.randn(m, inp, device="cuda", generator=generator).to(torch.bfloat16)
            figures = {}
            for variant, (fn, nbytes, error) in kernel_variants(weight, x).items():
                if fn is None:
                    figures[variant] = {"error": error}
                    continue
                try:
                    t = timed(fn)
                except Exception as exc:
                    figures[variant] = {"error": first_line(exc)}
                    continue
                best = t.get("graph_us", t["eager_us"])
                figures[variant] = {**t, "weight_bytes": nbytes, "rel_error": error,
                                    "weight_gb_per_s": round(nbytes / best / 1e3, 1)}
            base = figures["bf16"]
            for variant, f in figures.items():
                if "eager_us" in f and variant != "bf16":
                    f["speedup_eager"] = round(base["eager_us"] / f["eager_us"], 2)
                    if "graph_us" in f and "graph_us" in base:
                        f["speedup_graph"] = round(base["graph_us"] / f["graph_us"], 2)
            emit("kernel", shape=name, out_features=out, in_features=inp, tokens=m, kernels=figures)
            del x
        del weight
        torch.cuda.empty_cache()


class Int4Linear(torch.nn.Module):
    """A bf16 model's linear running tinygemm int4 (the engine's RTN grid)."""

    def __init__(self, linear: torch.nn.Linear, group: int):
        super().__init__()
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        packed, sz = int4_pack(linear.weight.detach().float().cuda(), group)  # the CUDA layout is built on the GPU
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", sz)

    def forward(self, x):
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, self.group, self.scales_zeros)
        return y.reshape(*x.shape[:-1], self.out_features)


def block_linear_names(model) -> list[str]:
    from shrink_core.model.inventory import block_linears, inventory

    return [row.name for row in block_linears(inventory(model))]


def swap_int4_(model, group: int) -> int:
    count = 0
    for name in block_linear_names(model):
        parent, _, leaf = name.rpartition(".")
        module = model.get_submodule(name)
        if module.in_features % group:
            continue
        setattr(model.get_submodule(parent), leaf, Int4Linear(module, group))
        count += 1
    return count


def fake_quant_(model, group: int) -> None:
    with torch.no_grad():
        for name in block_linear_names(model):
            module = model.get_submodule(name)
            if module.in_features % group == 0:
                module.weight.copy_(int4_dequant(module.weight.float(), group).to(module.weight.dtype))


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for row in windows:
        ids = row[None].cuda()
        logits = model(input_ids=ids, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
        total, count = total + float(loss), count + ids.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def speed(model, vocab: int, prompt: int = 512, decode: int = 128, batch: int = 1) -> dict:
    """Prefill ms for `prompt` tokens and eager greedy decode tokens/s with the KV cache (CUDA events)."""
    ids = torch.randint(0, vocab, (batch, prompt), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, use_cache=False)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    prefill = []
    for _ in range(5):
        start.record()
        model(input_ids=ids, use_cache=False)
        end.record()
        end.synchronize()
        prefill.append(start.elapsed_time(end))
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    for _ in range(8):  # warm the decode path too: unwarmed, the first candidate's decode read 3x slow on the H200
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(decode):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return {"batch": batch, "prompt_tokens": prompt, "prefill_ms_median": round(statistics.median(prefill), 2),
            "prefill_tokens_per_s": round(batch * prompt / statistics.median(prefill) * 1000),
            "decode_tokens": decode, "decode_ms_per_token": round(seconds / decode * 1000, 3),
            "decode_tokens_per_s": round(batch * decode / seconds, 1),
            "peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def weight_mib(model) -> float:
    total = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return round(total / 2**20, 1)


def part_model(spec: str, group: int, windows_count: int) -> None:
    import copy

    from shrink_core.evaluation.calibration import slice_texts, token_windows
    from shrink_core.model.load import load

    started = time.perf_counter()
    loaded = load(spec)
    emit("model_load", spec=spec, seconds=round(time.perf_counter() - started, 1),
         parameters=sum(p.numel() for p in loaded.model.parameters()))
    reference = loaded.model.eval()
    windows = token_windows(loaded.tokenizer, slice_texts("en", "eval"), windows_count, 512)
    vocab = reference.config.vocab_size

    def build(name: str):
        model = copy.deepcopy(reference)
        if name.endswith("simulated_bf16"):
            fake_quant_(model, group)
        elif name.endswith("tinygemm"):
            swap_int4_(model, group)
        return model.to("cuda", torch.bfloat16)

    # one candidate on the GPU at a time, so each peak-memory figure is that candidate's own
    for name in ("bf16", f"w4g{group}_simulated_bf16", f"w4g{group}_tinygemm"):
        model = None
        try:
            model = build(name)
            figures = {"weights_mib": weight_mib(model), f"en_ppl_512x{len(windows)}": round(perplexity(model, windows), 4)}
            figures.update(speed(model, vocab, batch=1))
            figures["batch8"] = speed(model, vocab, batch=8, decode=64)
            emit("model", candidate=name, runtime=f"pytorch-eager {torch.__version__}, bf16 activations", **figures)
        except Exception as exc:
            emit("model", candidate=name, error=first_line(exc))
        del model
        torch.cuda.empty_cache()


def part_train_raw(spec: str, keep_blocks: int, batch: int, seq_len: int, reps: int = 10) -> None:
    """Training throughput pieces on the GPU, fp32 as the distill run trains: the student's own forward+backward
    (next-token loss), the teacher's forward, and one distill step's worth of both plus the KL (no optimizer)."""
    import copy

    from shrink_core.distill.train import kl_loss, next_token_loss
    from shrink_core.model.load import load

    loaded = load(spec)
    teacher = loaded.model.eval().to("cuda")
    for param in teacher.parameters():
        param.requires_grad_(False)
    student = copy.deepcopy(loaded.model).to("cuda").train()
    student.model.layers = student.model.layers[:keep_blocks]  # throughput depends on the shape, not on which blocks
    student.config.num_hidden_layers = keep_blocks
    for param in student.parameters():
        param.requires_grad_(True)
    ids = torch.randint(0, teacher.config.vocab_size, (batch, seq_len), device="cuda")

    def student_step():
        loss = next_token_loss(student(input_ids=ids, use_cache=False).logits, ids)
        loss.backward()
        student.zero_grad(set_to_none=True)

    def teacher_forward():
        with torch.no_grad():
            teacher(input_ids=ids, use_cache=False)

    def distill_step():
        with torch.no_grad():
            target = teacher(input_ids=ids, use_cache=False).logits
        kl_loss(student(input_ids=ids, use_cache=False).logits, target, 2.0).backward()
        student.zero_grad(set_to_none=True)

    for name, fn in (("student_forward_backward", student_step), ("teacher_forward", teacher_forward),
                     ("teacher_plus_student_kl_step", distill_step)):
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            started = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        emit("train_raw", what=name, dtype="fp32", tf32=torch.backends.cuda.matmul.allow_tf32, batch=batch,
             seq_len=seq_len, student_blocks=keep_blocks, seconds_median=round(median, 4),
             tokens_per_s=round(batch * seq_len / median), peak_memory_mib=round(torch.cuda.max_memory_allocated() / 2**20))


def main() -> int:
    global OUT
    parser = argparse.ArgumentParser()
    parser.add_argument("--parts", default="env,kernels,model")
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--windows", type=int, default=32, help="512-token en eval windows for the perplexity check")
    parser.add_argument("--keep-blocks", type=int, default=20, help="student depth for train_raw")
    parser.add_argument("--batch", type=int, default=8, help="train_raw batch (sequences)")
    parser.add_argument("--seq-len", type=int, default=512, help="train_raw sequence length")
    parser.add_argument("--quick", action="store_true", help="two shapes, two token counts (a smoke run)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    OUT = args.out
    if not torch.cuda.is_available():
        print(json.dumps({"bench": "gpu", "error": "torch sees no CUDA GPU; run this bench on a machine with one."}))
        return 1
    parts = args.parts.split(",")
    shapes, tokens = (SHAPES[:1] + SHAPES[5:6], TOKENS[:2]) if args.quick else (SHAPES, TOKENS)
    for part in parts:
        started = time.perf_counter()
        try:
            if part == "env":
                part_env()
            elif part == "kernels":
                part_kernels(shapes, tokens)
            elif part == "model":
                part_model(args.model, args.group, args.windows)
            elif part == "train_raw":
                part_train_raw(args.model, args.keep_blocks, args.batch, args.seq_len)
        except Exception as exc:
            emit(part, error=first_line(exc))
        emit("done", which=part, seconds=round(time.perf_counter() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
