"""Incoherence processing (QuIP / QuaRot-style input rotations) before a quantizer runs: issue 17's 3-bit candidate.

Each block linear reads its input through a random orthogonal R (in, in), one per input source of a block (q/k/v share
one, gate/up share one, o and down one each), and its weight becomes W R^T: x R^T (W R^T)^T = x W^T, so the
full-precision function is unchanged (up to float rounding). Outlier input channels are spread over all channels,
and the quantizer (RTN, GPTQ, gptq-seq) sees the rotated inputs through its own hooks: GPTQ's H becomes R H R^T. After
quantization the rotation is folded back into the weight (Q R), so the measured model is a plain one holding exactly
what a runtime that applies R to each layer's input would compute with the stored codes. The codes' bytes are the
plan's; R costs a seed. At inference a dense R is an (in, in) product per source and token, not measured here. The
fast form (a signed Hadamard Kronecker a small orthogonal matrix) is the engine's: the plan's `rotate: hadamard`,
shrink_core/compression/rotate.py, measured as the bench's `had-*` methods.
"""
from __future__ import annotations

import time

import torch

from shrink_core.compression.calibrate import input_source


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def rotate_(model, rows, seed: int = 0) -> dict:
    """Rotate every row's module (inventory rows of block linears) in place by a Haar-random dense R; returns what
    `unrotate_` needs. (The fast Hadamard form is the engine's plan option `rotate: hadamard`.)"""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    rotations: dict[tuple[int, str], torch.Tensor] = {}
    done = []
    for row in rows:
        module = model.get_submodule(row.name)
        key = (row.block, input_source(row.name, row.kind))
        if key not in rotations:
            rotations[key] = _orthogonal(module.weight.shape[1], generator)
        rotation = rotations[key]
        weight = module.weight.data
        module.weight.data = (weight.double() @ rotation.T).to(weight.dtype)
        r = rotation.to(weight.dtype)
        handle = module.register_forward_pre_hook(lambda mod, args, r=r: (args[0] @ r.T.to(args[0].dtype), *args[1:]))
        done.append((module, rotation, handle))
    return {"modules": done, "seconds": time.perf_counter() - started, "sources": len(rotations)}


def unrotate_(rotated: dict) -> float:
    """Fold each rotation back into its (now quantized) weight and remove the input hooks; returns the seconds."""
    started = time.perf_counter()
    for module, rotation, handle in rotated["modules"]:
        handle.remove()
        weight = module.weight.data
        module.weight.data = (weight.double() @ rotation).to(weight.dtype)
    return time.perf_counter() - started
