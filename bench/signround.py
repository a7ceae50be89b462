"""Learned rounding, SignRound-style (issue 17's candidate), block by block, as a bench method.

Each block linear's weight is quantized asymmetrically per group, in the project's stored format (float16 scale,
8-bit zero per group), with three learned tensors: a rounding offset V in [-0.5, 0.5] per weight, and two clip
factors in [0.5, 1] per group for the group's minimum and maximum. Rounding passes gradients straight through.
The block's output on the quantized model's own inputs is fitted to the full-precision block's output on the
full-precision inputs (the same target as gptq-seq), by signed-gradient descent with a linearly decaying step,
one minibatch of sequences a step. Starting point: V = 0 and no clipping, i.e. round-to-nearest.

`grids` (refinement of another quantizer's result, e.g. gptq-seq's): each linear keeps the given per-group scale and
zero, starts at the codes its current weight holds on that grid, and learns an offset per code in [-1, 1] (a move of
at most one level; the step doubles so the offset can travel that far); a block keeps the tuned codes only if their
loss on the whole calibration is below the starting codes'.
"""
from __future__ import annotations

import os
import time

import torch
from torch.nn.utils import parametrize

from shrink_core.compression import calibrate
from shrink_core.compression.primitives import MIN_SCALE, from_groups, to_groups
from shrink_core.model.arch import block_kwargs, decoder_layers, run_layer

GRID_LR = float(os.environ.get("SIGNROUND_GRID_LR", "2"))  # the refinement's step, x 1/steps


def _round(x: torch.Tensor) -> torch.Tensor:
    return x + (x.round() - x).detach()  # rounds forward, passes the gradient through


class LearnedRounding(torch.nn.Module):
    """weight -> its quantize-dequantize under the learned offsets and clip factors (a parametrization)."""

    def __init__(self, weight: torch.Tensor, bits: int, group_size: int):
        super().__init__()
        rows, columns = weight.shape
        groups = to_groups(weight, group_size).shape[1]
        self.bits, self.group_size, self.columns = bits, group_size, columns
        self.offset = torch.nn.Parameter(torch.zeros(rows, groups, group_size))
        self.low = torch.nn.Parameter(torch.ones(rows, groups))
        self.high = torch.nn.Parameter(torch.ones(rows, groups))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        top = 2 ** self.bits - 1
        grouped = to_groups(weight.float(), self.group_size)
        low = grouped.amin(dim=-1).clamp(max=0) * self.low
        high = grouped.amax(dim=-1).clamp(min=0) * self.high
        scale = ((high - low) / top).clamp(min=MIN_SCALE)
        scale = scale + (scale.half().float() - scale).detach()  # stored as float16
        zero = _round(-low / scale).clamp(0, top)
        codes = _round(grouped / scale[..., None] + self.offset + zero[..., None]).clamp(0, top)
        return from_groups((codes - zero[..., None]) * scale[..., None], self.columns).to(weight.dtype)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offset.clamp_(-0.5, 0.5)
            self.low.clamp_(0.5, 1.0)
            self.high.clamp_(0.5, 1.0)


class GridRounding(torch.nn.Module):
    """weight -> codes on a fixed per-group grid, started at `codes` (rows, groups, size), moved by a learned offset."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, columns: int):
        super().__init__()
        self.bits, self.columns = bits, columns
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero", zero.float())
        self.offset = torch.nn.Parameter(torch.zeros_like(codes))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int):
        grouped = to_groups(weight.float(), group_size)
        codes = (grouped / scale[..., None] + zero[..., None]).round().clamp(0, 2 ** bits - 1)
        return cls(codes, scale, zero, bits, weight.shape[1])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        codes = _round(self.codes + self.offset).clamp(0, 2 ** self.bits - 1)
        return from_groups((codes - self.zero[..., None]) * self.scale[..., None], self.columns).to(weight.dtype)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.offset.clamp_(-1.0, 1.0)


def block_linears(layer) -> list[torch.nn.Linear]:
    return [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def tune_block(layer, inputs, targets, bits: int, group_size: int, steps: int, minibatch: int,
               generator: torch.Generator, grids: dict | None = None) -> dict:
    """Learn the rounding of every linear in `layer` (in place; the weights end quantized). grids: linear -> (scale,
    zero) to refine the codes the linear's weight holds on them (see the module's docstring)."""
    for p in layer.parameters():
        p.requires_grad_(False)
    rounders = []
    for linear in block_linears(layer):
        if grids is None:
            rounder = LearnedRounding(linear.weight, bits, group_size)
        else:
            rounder = GridRounding.from_weight(linear.weight, *grids[linear], bits, group_size)
        parametrize.register_parametrization(linear, "weight", rounder)
        linear.parametrizations.weight.original.requires_grad_(False)
        rounders.append(rounder)
    params = [p for r in rounders for p in r.parameters()]
    hidden = torch.cat([h for h, _ in inputs])
    target = torch.cat([t for t, _ in targets])
    kwargs = inputs[0][1]  # built for one sequence; broadcasts over any batch
    losses = []
    start = _whole_loss(layer, hidden, target, kwargs, minibatch) if grids is not None else None
    with torch.enable_grad():
        for step in range(steps):
            pick = torch.randperm(len(hidden), generator=generator)[:minibatch]
            out = run_layer(layer, hidden[pick], kwargs)
            loss = (out - target[pick]).pow(2).mean()
            loss.backward()
            lr = (1.0 if grids is None else GRID_LR) / steps * (1 - step / steps)  # AutoRound's: 1/steps, decaying to 0
            with torch.no_grad():
                for p in params:
                    p.sub_(lr * p.grad.sign())
                    p.grad = None
            for r in rounders:
                r.clamp_()
            losses.append(loss.item())
    figures = {"first_loss": losses[0], "last_loss": sum(losses[-10:]) / len(losses[-10:])}
    if start is not None:
        end = _whole_loss(layer, hidden, target, kwargs, minibatch)
        figures.update(start=start, end=end, kept=end < start)
        if end >= start:
            with torch.no_grad():
                for r in rounders:
                    r.offset.zero_()
    for linear in block_linears(layer):
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
    return figures


def _whole_loss(layer, hidden, target, kwargs, batch: int) -> float:
    """The block's mean squared error against its targets over every calibration sequence."""
    total = 0.0
    with torch.no_grad():
        for at in range(0, len(hidden), batch):
            out = run_layer(layer, hidden[at:at + batch], kwargs)
            total += (out - target[at:at + batch]).pow(2).sum().item()
    return total / target.numel()


def signround_(model, calibration: torch.Tensor, bits: int, group_size: int, steps: int = 100, minibatch: int = 2,
               seed: int = 0, log=print, reference=None, grids: dict | None = None) -> dict:
    """Quantize every block linear of `model` in place by learned rounding; returns the time and per-block losses.
    With `grids` (module name -> (scale, zero)), refine the codes `model` already holds on them; the targets then come
    from `reference`, the full-precision model."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    layers = decoder_layers(model)
    fp_layers = decoder_layers(reference) if reference is not None else None
    by_module = None
    if grids is not None:
        by_module = {module: grids[name] for name, module in model.named_modules() if name in grids}
    per_block = block_kwargs(model, calibration[:1])
    with torch.no_grad():
        q_inputs = calibrate.first_block_inputs(model, calibration, batch_size=len(calibration))
    fp_inputs = q_inputs  # run_block returns new tensors, so the two streams never share a write
    blocks = []
    for position, layer in enumerate(layers):
        q_inputs = [(h, per_block[position]) for h, _ in q_inputs]
        fp_inputs = [(h, per_block[position]) for h, _ in fp_inputs]
        with torch.no_grad():
            targets = calibrate.run_block(fp_layers[position] if fp_layers is not None else layer, fp_inputs)
        figures = tune_block(layer, q_inputs, targets, bits, group_size, steps, minibatch, generator, by_module)
        with torch.no_grad():
            q_inputs = calibrate.run_block(layer, q_inputs)
        fp_inputs = targets
        blocks.append(figures)
        whole = (f"; whole {figures['start']:.4g} -> {figures['end']:.4g}, {'kept' if figures['kept'] else 'undone'}"
                 if "start" in figures else "")
        log(f"block {position}: loss {figures['first_loss']:.4g} -> {figures['last_loss']:.4g}{whole} "
            f"({time.perf_counter() - started:.0f} s)")
    return {"seconds": time.perf_counter() - started, "blocks": blocks}
