"""The training loop: KL on temperature-softened teacher logits (+ next-token and hidden-state terms), AdamW, warm-up +
cosine decay, gradient clipping, checkpoints that resume bit-identically.

Resume is exact because everything a step depends on is either in the checkpoint (weights, optimizer, scheduler, RNG,
step) or a pure function of (seed, step): the batch of step s is `batch_indices(seed, s, ...)`.
Teacher logits are computed on the fly for every batch, over the full vocabulary (no top-k cache).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from shrink_core.distill.config import DistillConfig
from shrink_core.errors import ShrinkError

CHECKPOINT = "checkpoint.pt"


# ---------------------------------------------------------------- pure math


def kl_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token at temperature T, scaled by T^2 (Hinton); logits (batch, seq, vocab)."""
    t = temperature
    log_student = F.log_softmax(student_logits.float() / t, dim=-1)  # (batch, seq, vocab)
    log_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    per_token = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)  # (batch, seq)
    return per_token.mean() * t * t


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting tokens[:, 1:] from logits[:, :-1]; logits (batch, seq, vocab), tokens (batch, seq)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def hidden_loss(student_states, teacher_states, kept: list[int]) -> torch.Tensor:
    """Mean MSE between the output of student block i and of teacher block kept[i] (the last block excluded: the
    model's final hidden state is after the norm). States are (batch, seq, hidden) tuples, index 0 = embeddings."""
    pairs = [(student_states[i + 1], teacher_states[k + 1]) for i, k in enumerate(kept[:-1])]
    if not pairs:
        return student_states[0].new_zeros(())
    return torch.stack([F.mse_loss(s, t) for s, t in pairs]).mean()


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(seed: int, step: int, pool: int, batch_size: int) -> torch.Tensor:
    """The training windows of one step: a pure function of (seed, step), so a resumed run sees the same data."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randperm(pool, generator=generator)[:batch_size]


# ---------------------------------------------------------------- state


@dataclass
class TrainState:
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: int = 0  # steps completed


def make_state(student, config: DistillConfig) -> TrainState:
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.warmup_steps, config.steps, config.min_lr_ratio))
    return TrainState(student, optimizer, scheduler)


def save_checkpoint(state: TrainState, directory: Path, config: DistillConfig, extra: dict | None = None) -> Path:
    """Weights + optimizer + scheduler + RNG + step, written atomically (a kill mid-write leaves the last one)."""
    directory.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": state.step, "config": config.to_dict(),
        "model": state.student.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "extra": extra or {},
    }
    path = directory / CHECKPOINT
    tmp = path.with_suffix(".partial")
    torch.save(payload, tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    tmp.replace(path)
    (directory / "checkpoint.json").write_text(json.dumps({"step": state.step, "saved": time.time()}))
    return path


def checkpoint_step(directory: Path) -> int | None:
    """The step of the last checkpoint, read from its small sidecar (no torch.load); None without one."""
    try:
        return int(json.loads((Path(directory) / "checkpoint.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint_(state: TrainState, directory: Path) -> dict:
    """Restore a TrainState in place from `directory`; returns the checkpoint's config dict and extra."""
    path = directory / CHECKPOINT
    try:  # the restricted loader: tensors and plain values, never an arbitrary object (a planted file runs nothing)
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ShrinkError(f"The checkpoint {path} holds more than tensors and plain values, so it was not loaded; "
                          "delete it to start the run over.") from exc
    state.student.load_state_dict(payload["model"])
    state.optimizer.load_state_dict(payload["optimizer"])
    state.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    if payload.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    state.step = payload["step"]
    return {"config": payload["config"], "extra": payload["extra"]}


def has_checkpoint(directory: Path) -> bool:
    return (Path(directory) / CHECKPOINT).is_file()


def drop_checkpoint(directory: Path) -> None:
    """Remove the resume state of a run whose student is saved (weights plus the optimizer's two moments: about 3x the
    student in fp32); the sidecar stays, so the run still shows its last step."""
    (Path(directory) / CHECKPOINT).unlink(missing_ok=True)


# ---------------------------------------------------------------- the loop


def losses(student, teacher, tokens: torch.Tensor, config: DistillConfig, kept: list[int] | None) -> dict:
    """The weighted loss and its terms for one batch (tokens (batch, seq) on the models' device)."""
    want_hidden = config.hidden_weight > 0 and kept is not None
    with torch.no_grad():
        teacher_out = teacher(input_ids=tokens, use_cache=False, output_hidden_states=want_hidden)
    student_out = student(input_ids=tokens, use_cache=False, output_hidden_states=want_hidden)
    terms = {"kl": kl_loss(student_out.logits, teacher_out.logits, config.temperature)}
    if config.ce_weight > 0:
        terms["ce"] = next_token_loss(student_out.logits, tokens)
    if want_hidden:
        terms["hidden"] = hidden_loss(student_out.hidden_states, teacher_out.hidden_states, kept)
    weights = {"kl": config.kl_weight, "ce": config.ce_weight, "hidden": config.hidden_weight}
    terms["loss"] = sum(weights[k] * v for k, v in terms.items())
    return terms


def heldout_loss(student, teacher, tokens: torch.Tensor, config: DistillConfig) -> float:
    """KL on the held-out windows (never trained on), in batches, without gradients."""
    was_training = student.training
    student.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], config.batch_size):
            batch = tokens[start:start + config.batch_size]
            teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            student_logits = student(input_ids=batch, use_cache=False).logits
            total += kl_loss(student_logits, teacher_logits, config.temperature).item() * batch.shape[0]
    student.train(was_training)
    return total / tokens.shape[0]


Callback = Callable[[int, dict], None]


def train_(state: TrainState, teacher, pool: torch.Tensor, heldout: torch.Tensor, config: DistillConfig,
           checkpoint_dir: Path | None = None, on_metrics: Callback | None = None, stop_after: int | None = None,
           deadline: float | None = None, kept: list[int] | None = None) -> TrainState:
    """Train from state.step to config.steps (or until `stop_after` steps / the wall-clock `deadline`).

    `on_metrics(step, values)` is called after every step (train_loss, lr, tokens_per_s, and heldout_loss every
    eval_every steps), before that step's checkpoint; it may raise (cancel): the last checkpoint stays valid.
    pool/heldout: (n, seq_len) tokens.
    """
    device = next(state.student.parameters()).device
    state.student.train()
    teacher.eval()
    tokens_per_step = config.batch_size * config.seq_len
    done_here = 0
    while state.step < config.steps:
        if stop_after is not None and done_here >= stop_after:
            break
        if deadline is not None and time.time() >= deadline:
            break
        started = time.perf_counter()
        index = batch_indices(config.seed, state.step, pool.shape[0], config.batch_size)
        batch = pool[index].to(device)
        terms = losses(state.student, teacher, batch, config, kept)
        state.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(state.student.parameters(), config.grad_clip)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        done_here += 1
        if device.type == "cuda":  # kernels run asynchronously: wait for them, or the time is not this step's
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        values = {"train_loss": terms["loss"].item(), "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_step / seconds, **{f"train_{k}": v.item() for k, v in terms.items()
                                                                if k != "loss"}}
        if state.step % config.eval_every == 0 or state.step == config.steps:
            values["heldout_loss"] = heldout_loss(state.student, teacher, heldout.to(device), config)
        # metrics before the checkpoint: a process killed between the two resumes from the previous checkpoint and
        # logs this step again, where the other order resumed past a step whose metrics were never logged
        if on_metrics is not None:
            on_metrics(state.step, values)
        if checkpoint_dir is not None and (state.step % config.checkpoint_every == 0 or state.step == config.steps):
            save_checkpoint(state, checkpoint_dir, config)
    state.student.eval()
    return state
