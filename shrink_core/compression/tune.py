"""End-to-end tuning of the group scales after quantization (the plan's `tune: scales`; EfficientQAT's E2E-QP idea).

Every integer-quantized block linear keeps its codes and zeros; only its group scales are trained, through
the whole model at once, so that the quantized model's next-token distribution matches the unquantized model's:
KL(reference || quantized) per token on the calibration rows, the quantity the benchmarks score on other rows. The
bytes do not change (the scales are stored anyway). gptq-seq fits each block to its own full-precision output; this
sees how the blocks' errors add up at the logits. A scale is trained as s0 * exp(theta), theta starting at 0 (Adam,
cosine-decayed), and passes through the stored format's rounding (float16, or the log8 grid) in every forward, so
what is trained is what is stored.
`holdout` calibration rows, drawn at random, are not trained on: the tuned scales are kept only if the KL there falls.
Without a set `lr`, each module's step follows its bit-width (auto_lr).
"""
from __future__ import annotations

import math
import time
from dataclasses import replace

import torch
from torch.nn.utils import parametrize

from shrink_core.compression.primitives import from_groups, quantize, stored_scale, to_groups
from shrink_core.errors import ShrinkError


class TunedScales(torch.nn.Module):
    """A linear's weight as (codes - zero) * s0 * exp(theta), turned back through its input rotation if it has one
    (a parametrization: the module's forward is unchanged)."""

    def __init__(self, weight: torch.Tensor, state):
        super().__init__()
        basis = weight.float() if state.rotation is None else state.rotation.apply(weight.float())
        codes = to_groups(quantize(basis, state.scale, state.zero, state.bits, state.group_size).float(),
                          state.group_size)  # (out, groups, size); a partial last group padded with code 0
        self.columns, self.rotation, self.stored = weight.shape[1], state.rotation, state.scales
        self.register_buffer("centred", codes - state.zero[..., None])  # (out, groups, size)
        self.register_buffer("scale0", state.scale.float())
        self.theta = torch.nn.Parameter(torch.zeros_like(self.scale0))

    def scale(self) -> torch.Tensor:
        scale = self.scale0 * torch.exp(self.theta)
        # exactly the stored values forward (the difference is 0, not a rounding residue), the gradient straight through
        return stored_scale(scale.detach(), self.stored) + (scale - scale.detach())

    def weight(self) -> torch.Tensor:
        values = from_groups(self.centred * self.scale()[..., None], self.columns)
        return values if self.rotation is None else self.rotation.invert(values)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.weight().to(weight.dtype)

    def trainable(self, lr: float) -> list[tuple[float, torch.nn.Parameter]]:
        """(Adam step, parameter) pairs; a subclass that trains more (a bench's) adds its own."""
        return [(lr, self.theta)]

    def reset(self) -> None:
        """Back to the quantization's values (a tuning the held-out rows refused)."""
        self.theta.zero_()


# Adam steps on theta measured on SmolLM2 (docs/methods.md): at 3 bits 2e-3 is kept and lowers KL 13-21%; at 4 bits
# it overfits the calibration rows (held-out KL 0.050 -> 0.060, refused) while 5e-4 is kept (0.050 -> 0.047). The
# finer the grid, the smaller the scales' own error and the sooner 56 sequences are overfitted.
COARSE_LR, FINE_LR = 2e-3, 5e-4  # up to 3 bits, 4 bits and up


# Seconds a step of 2 x 512 tokens takes on SmolLM2 with 2 CPU cores (docs/methods.md): with bfloat16 autocast on a
# Sapphire Rapids (calibrate.fast_forward_dtype), and in float32 on an AMD EPYC Zen 3 without AVX512-BF16 (200 steps
# in 2,365 s alone; an earlier 30 s was a py-spy sample beside other work).
STEP_SECONDS_SMOLLM2 = {"bfloat16": 3.4, "float32": 12.0}


def auto_lr(bits: int) -> float:
    """The Adam step for the scales of a module quantized to `bits` when the plan sets none."""
    return COARSE_LR if bits <= 3 else FINE_LR


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(softmax(ref) || softmax(logits)), in float32."""
    ref = torch.log_softmax(ref_logits.float(), dim=-1)
    return (ref.exp() * (ref - torch.log_softmax(logits.float(), dim=-1))).sum(-1).mean()


def split_rows(n: int, holdout: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) row indices, drawn at random with a fixed seed: the calibration mix's rows come in order."""
    if holdout >= n:
        raise ShrinkError(f"tune: holdout {holdout} leaves none of the {n} calibration rows to train on; lower "
                          "holdout or raise the calibration's n_sequences.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    return order[holdout:], order[:holdout]


def tune_scales_(model, reference, targets: dict, calibration: torch.Tensor, spec, *,
                 autocast: torch.dtype | None = None, progress=None, tuner=TunedScales) -> dict:
    """Train the scales of `targets` (name -> (linear module, QuantState)) in `model`, in place: the weights end on
    the tuned stored grid. Returns the figures and {name: QuantState with its tuned scale} under "states".
    `tuner(weight, state)` builds each module's parametrization: TunedScales, or a subclass that trains more."""
    started = time.perf_counter()
    device = next(model.parameters()).device
    train, held = split_rows(len(calibration), spec.holdout)
    trainable = {p: p.requires_grad for p in model.parameters()}
    for p in trainable:
        p.requires_grad_(False)
    tuners = {}
    try:
        for name, (module, state) in targets.items():
            built = tuner(module.weight, state).to(device)
            parametrize.register_parametrization(module, "weight", built)
            module.parametrizations.weight.original.requires_grad_(False)
            tuners[name] = built

        def cast():
            return torch.autocast(device.type, dtype=autocast, enabled=autocast is not None)

        def held_kl() -> float:
            with torch.no_grad(), cast():
                return sum(token_kl(reference(input_ids=ids).logits, model(input_ids=ids).logits).item()
                           for ids in calibration[held].to(device).split(spec.batch)) / math.ceil(len(held) / spec.batch)

        start = held_kl()
        rates = {name: spec.lr if spec.lr is not None else auto_lr(state.bits) for name, (_, state) in targets.items()}
        groups = {}
        for name, built in tuners.items():
            for lr, param in built.trainable(rates[name]):
                groups.setdefault(lr, []).append(param)
        optimizer = torch.optim.Adam([{"params": params, "lr": lr, "base_lr": lr} for lr, params in groups.items()])
        generator = torch.Generator().manual_seed(0)
        order, first, losses = train[torch.randperm(len(train), generator=generator)], 0, []
        with torch.enable_grad():
            for step in range(spec.steps):
                if first + spec.batch > len(order):  # a new epoch, reshuffled
                    order, first = train[torch.randperm(len(train), generator=generator)], 0
                ids = calibration[order[first:first + spec.batch]].to(device)
                first += spec.batch
                with torch.no_grad(), cast():
                    ref_logits = reference(input_ids=ids).logits
                with cast():
                    logits = model(input_ids=ids).logits
                loss = token_kl(ref_logits, logits)
                loss.backward()
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / spec.steps))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if progress:
                    progress((step + 1) / spec.steps, f"tuning scales: step {step + 1}/{spec.steps}, KL {loss.item():.4f}")
        end = held_kl()
        kept = end < start
        with torch.no_grad():
            if not kept:
                for built in tuners.values():
                    built.reset()
            states = {name: replace(state, scale=tuners[name].scale().detach().cpu().clone())
                      for name, (_, state) in targets.items()}
            moved = torch.cat([t.theta.flatten() for t in tuners.values()]).abs()
    finally:
        for name in tuners:
            module = targets[name][0]
            flag = trainable[module.parametrizations.weight.original]
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(flag)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return {"states": states, "lr": [[lr, len(params)] for lr, params in sorted(groups.items(), reverse=True)],
            "seconds": time.perf_counter() - started, "held_kl_start": start, "held_kl_end": end,
            "kept": kept, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:]),
            "scale_change_mean": moved.mean().item(), "scale_change_max": moved.max().item()}
