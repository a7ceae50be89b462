"""Incoherence processing (QuIP / QuaRot-style input rotations) before a quantizer runs: issue 17's 3-bit candidate.

Each block linear reads its input through a random orthogonal R (in, in), one per input source of a block (q/k/v share
one, gate/up share one, o and down one each), and its weight becomes W R^T: x R^T (W R^T)^T = x W^T, so the
full-precision function is unchanged (up to float rounding). Outlier input channels are spread over all channels,
and the quantizer (RTN, GPTQ, gptq-seq) sees the rotated inputs through its own hooks: GPTQ's H becomes R H R^T. After
quantization the rotation is folded back into the weight (Q R), so the measured model is a plain one holding exactly
what a runtime that applies R to each layer's input would compute with the stored codes. The codes' bytes are the
plan's; R costs a seed. What it would cost at inference (a dense (in, in) product per source and token, or a fast
Hadamard transform where the width allows one) is not measured here.
"""
from __future__ import annotations

import time

import torch

from shrink_core.compression.calibrate import input_source


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # Haar-distributed


def _hadamard_kron(n: int, generator: torch.Generator) -> torch.Tensor:
    """A rotation a runtime can apply in O(n log n): a Sylvester Hadamard of the largest power of two dividing n, with
    random signs on its inputs, Kronecker a random orthogonal matrix of the odd rest (576 = 64 x 9, 1536 = 512 x 3);
    every output channel still mixes every input channel."""
    power = n & -n
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < power:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)])
    signs = torch.randint(0, 2, (power,), generator=generator).double() * 2 - 1
    return torch.kron((hadamard * signs / power ** 0.5).contiguous(), _orthogonal(n // power, generator).contiguous())


def rotate_(model, rows, seed: int = 0, kind: str = "orthogonal") -> dict:
    """Rotate every row's module (inventory rows of block linears) in place; returns what `unrotate_` needs.
    kind: "orthogonal" (Haar random, dense) or "hadamard" (`_hadamard_kron`, fast to apply)."""
    make = {"orthogonal": _orthogonal, "hadamard": _hadamard_kron}[kind]
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    rotations: dict[tuple[int, str], torch.Tensor] = {}
    done = []
    for row in rows:
        module = model.get_submodule(row.name)
        key = (row.block, input_source(row.name, row.kind))
        if key not in rotations:
            rotations[key] = make(module.weight.shape[1], generator)
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
