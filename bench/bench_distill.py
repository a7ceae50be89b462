"""Distillation bench: drop a third of SmolLM2's blocks by block influence, distil for a time budget, report every slice.

Prints one JSON line: per-slice perplexity of the teacher, the undistilled student and the distilled student, the share
of the perplexity gap recovered, measured forward speed (student vs teacher, plain PyTorch, same process), training
throughput (teacher + student) against the student's own forward+backward throughput, and the load average.

  python bench/bench_distill.py --minutes 20            # the issue's target (time-boxed; steps fitted to the time)
  python bench/bench_distill.py --steps 50 --minutes 0  # a fixed number of steps
  python bench/bench_distill.py --device cuda --steps 200 --minutes 0 --slices en,code   # the same on a GPU

Training and the speed probes run on --device; evaluation runs on the CPU (the evaluation runner is CPU-only), so the
models move there for it and back. On CUDA the timings synchronise the GPU, and the peak GPU memory of training is
recorded (torch.cuda.max_memory_allocated).
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


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def sync(device) -> None:
    """Wait for queued GPU work, so a wall-clock interval covers it (CUDA kernels run asynchronously)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_seconds(model, tokens, reps: int) -> list[float]:
    import torch

    times = []
    with torch.no_grad():
        for _ in range(reps):
            sync(tokens.device)
            started = time.perf_counter()
            model(input_ids=tokens, use_cache=False)
            sync(tokens.device)
            times.append(time.perf_counter() - started)
    return times


def train_step_seconds(model, tokens, reps: int) -> list[float]:
    """The student alone: forward + next-token loss + backward (no teacher, no optimizer)."""
    from shrink_core.distill.train import next_token_loss

    times = []
    for _ in range(reps):
        sync(tokens.device)
        started = time.perf_counter()
        loss = next_token_loss(model(input_ids=tokens, use_cache=False).logits, tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)
        sync(tokens.device)
        times.append(time.perf_counter() - started)
    return times


def device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--teacher", default="builtin:smollm2-135m")
    parser.add_argument("--drop", type=int, default=10, help="blocks dropped by block influence")
    parser.add_argument("--minutes", type=float, default=20.0, help="training wall-clock budget (0: use --steps)")
    parser.add_argument("--steps", type=int, default=0, help="fixed steps (0: fitted to --minutes)")
    parser.add_argument("--mix", default="en=0.5,fr=0.1,de=0.1,zh=0.1,code=0.1,math=0.1")
    parser.add_argument("--slices", default="en,fr,de,zh,code,math,arc")
    parser.add_argument("--rows", type=int, default=32, help="text rows per slice (task slices: 2x questions)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=-1, help="warm-up steps (default: a tenth of the steps, <= 10)")
    parser.add_argument("--kl", action="store_true", help="also measure KL to the teacher (one more teacher pass)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"],
                        help="where training and the speed probes run (auto: cuda when torch sees a GPU)")
    args = parser.parse_args()

    import torch

    from shrink_core.distill import DistillConfig, block_influence, build_student, lowest_influence, parameter_count
    from shrink_core.distill.run import influence_tokens, resolve_device, training_data
    from shrink_core.distill.student import kept_blocks
    from shrink_core.distill.train import make_state, train_
    from shrink_core.evaluation.calibration import CalibrationRecipe
    from shrink_core.evaluation.evaluate import Protocol, evaluate
    from shrink_core.evaluation.slices import get_slice
    from shrink_core.model.load import load

    started = time.time()
    load_start = loadavg()
    loaded = load(args.teacher)
    teacher = loaded.model
    for p in teacher.parameters():
        p.requires_grad_(False)
    mix = CalibrationRecipe.parse(args.mix).mix
    base = DistillConfig(teacher=args.teacher, drop_count=args.drop, mix=mix, seq_len=args.seq_len,
                         batch_size=args.batch, pool_sequences=256, heldout_sequences=8, steps=1, lr=args.lr,
                         temperature=args.temperature, seed=args.seed, eval_every=25, warmup_steps=10,
                         device=args.device)
    device = resolve_device(base)
    teacher.to(device)
    t0 = time.perf_counter()
    influence = block_influence(teacher, influence_tokens(loaded.tokenizer, base))
    dropped = lowest_influence(influence, args.drop)
    influence_s = time.perf_counter() - t0
    student, _ = build_student(teacher, dropped)
    pool, heldout = training_data(loaded.tokenizer, base)

    # speed: per-token forward latency, same batch, interleaved, plain PyTorch fp32
    probe = pool[:args.batch].to(device)
    forward_seconds(teacher, probe, 1), forward_seconds(student, probe, 1)
    t_times, s_times = [], []
    for _ in range(5):
        t_times += forward_seconds(teacher, probe, 1)
        s_times += forward_seconds(student, probe, 1)
    tokens = probe.numel()
    speed = {"teacher_forward_tokens_per_s": tokens / statistics.median(t_times),
             "student_forward_tokens_per_s": tokens / statistics.median(s_times),
             "speedup": statistics.median(t_times) / statistics.median(s_times),
             "measured": f"median of 5 interleaved forwards of ({args.batch}, {args.seq_len}) tokens, fp32, "
                         f"{device_name(device)}, torch {torch.__version__}"}
    raw = train_step_seconds(student, probe, 3)
    raw_tps = tokens / statistics.median(raw)

    budget = Protocol("bench", text_rows=args.rows, task_items=2 * args.rows, long_docs=1, window=512, long_window=1024)
    slices = [get_slice(s) for s in args.slices.split(",")]

    def ppl(model, reference=None, reference_results=None):
        for m in (model, reference, teacher):  # the evaluation runner is CPU-only
            if m is not None:
                m.to("cpu")
        results = evaluate(model, loaded.tokenizer, slices, budget, reference=reference,
                           reference_results=reference_results)
        model.to(device)
        teacher.to(device)
        return {r.slice: r for r in results}

    t0 = time.perf_counter()
    teacher_eval = ppl(teacher)
    before = ppl(student, teacher if args.kl else None, teacher_eval if args.kl else None)
    eval_s = time.perf_counter() - t0
    print(json.dumps({"stage": "before", "speed": speed, "raw_fwd_bwd_tokens_per_s": raw_tps, "dropped": list(dropped),
                      "teacher": {s: r.ppl for s, r in teacher_eval.items()},
                      "undistilled": {s: r.ppl for s, r in before.items()}, "loadavg": loadavg()}),
          file=sys.stderr, flush=True)

    # steps fitted to the time budget from one measured distillation step (teacher forward + student fwd/bwd)
    steps = args.steps
    if not steps:
        trial = make_state(build_student(teacher, dropped)[0], DistillConfig(**{**base.__dict__, "steps": 2}))
        t0 = time.perf_counter()
        train_(trial, teacher, pool, heldout, DistillConfig(**{**base.__dict__, "steps": 2, "eval_every": 100}))
        step_s = (time.perf_counter() - t0) / 2
        heldout_share = 1 + (heldout.shape[0] / args.batch) * 0.35 / 25  # held-out KL every 25 steps
        steps = max(10, int(args.minutes * 60 / (step_s * heldout_share) * 0.97))
        del trial
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup = args.warmup if args.warmup >= 0 else min(10, max(1, steps // 10))
    config = DistillConfig(**{**base.__dict__, "steps": steps, "warmup_steps": warmup})
    state = make_state(student, config)
    log = []
    deadline = time.time() + args.minutes * 60 if args.minutes else None
    t0 = time.perf_counter()
    train_(state, teacher, pool, heldout, config, on_metrics=lambda step, v: log.append((step, v)),
           deadline=deadline, kept=kept_blocks(len(teacher.model.layers), dropped))
    print(json.dumps({"stage": "trained", "steps": state.step, "planned": steps, "log_tail": log[-1:]}), file=sys.stderr,
          flush=True)
    sync(device)
    train_s = time.perf_counter() - t0
    peak_gpu = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    load_train = loadavg()
    after = ppl(student, teacher if args.kl else None, teacher_eval if args.kl else None)

    per_slice = {}
    for s in teacher_eval:
        t, b, a = teacher_eval[s], before[s], after[s]
        gap = b.ppl - t.ppl
        entry = {"teacher_ppl": round(t.ppl, 3), "undistilled_ppl": round(b.ppl, 3), "distilled_ppl": round(a.ppl, 3),
                 "gap_recovered": round((b.ppl - a.ppl) / gap, 3) if gap > 0 else None,
                 "log_gap_recovered": round((math.log(b.ppl) - math.log(a.ppl)) / (math.log(b.ppl) - math.log(t.ppl)), 3)
                 if b.ppl > t.ppl else None, "items": a.items, "tokens": a.tokens,
                 "kl_to_teacher_before": round(b.kl, 4) if b.kl is not None else None,
                 "kl_to_teacher_after": round(a.kl, 4) if a.kl is not None else None}
        if t.accuracy is not None:
            entry.update({"teacher_acc": round(t.accuracy, 3), "undistilled_acc": round(b.accuracy, 3),
                          "distilled_acc": round(a.accuracy, 3)})
        per_slice[s] = entry
    train_tps = [v["tokens_per_s"] for _, v in log]
    heldout_curve = [(step, round(v["heldout_loss"], 4)) for step, v in log if "heldout_loss" in v]
    out = {
        "bench": "distill", "teacher": args.teacher, "device": str(device), "device_name": device_name(device),
        "evaluated_on": "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cores": os.cpu_count(),
        "dropped_blocks": list(dropped), "blocks_kept": len(student.model.layers),
        "influence": [round(x, 4) for x in influence], "influence_s": round(influence_s, 1),
        "teacher_params": parameter_count(teacher), "student_params": parameter_count(student),
        "config": {**config.to_dict(), "minutes": args.minutes, "rows_per_slice": args.rows},
        "steps_done": state.step, "steps_planned": steps, "train_minutes": round(train_s / 60, 2),
        "tokens_trained": state.step * args.batch * args.seq_len,
        "training_tokens_per_s_median": round(statistics.median(train_tps), 1) if train_tps else None,
        "training_tokens_per_s_overall": round(state.step * args.batch * args.seq_len / train_s, 1),
        "peak_gpu_memory_bytes_training": peak_gpu,
        "student_raw_fwd_bwd_tokens_per_s": round(raw_tps, 1),
        "speed": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in speed.items()},
        "heldout_kl_curve": heldout_curve,
        "first_train_loss": round(log[0][1]["train_loss"], 4) if log else None,
        "last_train_loss": round(log[-1][1]["train_loss"], 4) if log else None,
        "slices": per_slice, "eval_seconds_before": round(eval_s, 1),
        "loadavg_start": load_start, "loadavg_after_training": load_train, "loadavg_end": loadavg(),
        "total_minutes": round((time.time() - started) / 60, 2),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
