"""Input rotations around a block's quantization (incoherence processing, as in QuIP# and QuaRot).

Every block linear of an input source (q/k/v share one input, gate/up one, o and down one each) reads that input
through one orthogonal R, and its weight becomes W R^T: (x R^T)(W R^T)^T = x W^T, so the full-precision function is
unchanged. An outlier input channel is spread over all channels, so the quantizer sees a flatter weight and input.
The calibration forwards never rotate a token: the statistics of the rotated inputs are those of the inputs turned
(GPTQ's H = X^T X becomes R H R^T, `rotate_statistic`): two products of an (n, n) matrix instead of every token of
every calibration forward (SmolLM2 at 64 x 512 tokens: the per-token rotations took 79 s of a 229 s quantization, and
the whole went from 244 s to 196 s). The weight is W R^T only while it is compressed
(`rotated_weights`), then R is folded back (Q R): the model in memory is a plain one computing what a runtime that
applies R to each layer's input computes from the stored codes, which are those of Q, in the rotated basis.

R = kron(A, B): A a Sylvester Hadamard of the width's largest power-of-two factor with random signs on its inputs,
B a Haar-random orthogonal matrix of the odd rest (576 = 64 x 9, 1536 = 512 x 3, 14336 = 2048 x 7). Applying it
costs products with Hadamards of at most 256 wide (a wider one is a Kronecker product of those) and a small dense
product; no (n, n) rotation matrix is ever made. It is
regenerated from (seed, block, source), so a plan stores a seed, not matrices.
"""
from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch


@lru_cache(maxsize=64)
def _factors(seed: int, block: int, source: str, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(signs (p,), B (q, q)) in float64 for size = p * q, p the largest power of two dividing size."""
    power = size & -size
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{block}:{source}".encode()))
    signs = torch.randint(0, 2, (power,), generator=generator).double() * 2 - 1
    q, r = torch.linalg.qr(torch.randn(size // power, size // power, generator=generator, dtype=torch.float64))
    return signs, q * torch.sign(torch.diagonal(r))  # Haar-distributed


@lru_cache(maxsize=16)
def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


DENSE_HADAMARD = 256  # widest Hadamard multiplied as a matrix; wider ones are Kronecker products of these


def walsh_hadamard(x: torch.Tensor) -> torch.Tensor:
    """x H over the last dimension (a power of two), H the unnormalised Sylvester Hadamard: H_2n = [[H, H], [H, -H]].
    H_ab = H_a (x) H_b, so a wide one is a (b, b) product along the low index bits, then the rest along the high ones:
    matrix products of at most 256 wide, which BLAS runs faster than log2(n) butterfly passes through memory."""
    n = x.shape[-1]
    if n <= DENSE_HADAMARD:
        return x @ _sylvester(n).to(x.device, x.dtype)
    rows = x.numel() // n
    low = x.reshape(rows * (n // DENSE_HADAMARD), DENSE_HADAMARD) @ _sylvester(DENSE_HADAMARD).to(x.device, x.dtype)
    high = low.reshape(rows, n // DENSE_HADAMARD, DENSE_HADAMARD).transpose(1, 2).reshape(-1, n // DENSE_HADAMARD)
    return walsh_hadamard(high).reshape(rows, DENSE_HADAMARD, n // DENSE_HADAMARD).transpose(1, 2).reshape(x.shape)


@dataclass(frozen=True)
class Rotation:
    """One input source's R (size, size) in one block; see the module docstring."""

    seed: int
    block: int
    source: str
    size: int

    def _parts(self, x: torch.Tensor):
        signs, odd = _factors(self.seed, self.block, self.source, self.size)
        power = signs.numel()
        return signs.to(x.device, x.dtype), odd.to(x.device, x.dtype), power, odd.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x R^T over the last dimension: with X = x as (p, q), A X B^T, A = H diag(signs) / sqrt(p)."""
        return self._transform(x, inverse=False)

    def invert(self, x: torch.Tensor) -> torch.Tensor:
        """x R over the last dimension: A^T X B."""
        return self._transform(x, inverse=True)

    def _transform(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        # Every product is one 2-D matrix product on a contiguous matrix: a strided batch of tokens' (q, p) grids
        # would run as thousands of tiny products (3x slower than the whole calibration pass it sits in).
        signs, odd, p, q = self._parts(x)
        tokens = x.numel() // self.size
        grid = x.reshape(tokens * p, q) @ (odd if inverse else odd.T)
        grid = grid.reshape(tokens, p, q).transpose(1, 2).reshape(tokens * q, p)  # rows over p, for A
        if inverse:
            grid = walsh_hadamard(grid) * (signs / p ** 0.5)
        else:
            grid = walsh_hadamard(grid * signs) / p ** 0.5
        return grid.reshape(tokens, q, p).transpose(1, 2).reshape(x.shape)

    def describe(self) -> dict:
        return {"kind": "hadamard", "seed": self.seed, "block": self.block, "source": self.source, "size": self.size,
                "odd_factor": self.size // (self.size & -self.size)}


def rotate_statistic(matrix: torch.Tensor, rotation: Rotation, chunk: int = 1024) -> torch.Tensor:
    """R M R^T, written over `matrix` and returned: a statistic M = X^T Y (n, n) of a module's inputs as the rotated
    inputs X R^T and Y R^T would give it. A chunk of rows or columns at a time, so an 8B's 14336-wide statistic
    (822 MB in float32) needs one more buffer its size, not several."""
    turned = torch.empty_like(matrix)
    for start in range(0, matrix.shape[0], chunk):  # N = M R^T, row by row
        turned[start:start + chunk] = rotation.apply(matrix[start:start + chunk])
    for start in range(0, matrix.shape[1], chunk):  # R N, a block of columns at a time: (R N_j)^T = N_j^T R^T
        matrix[:, start:start + chunk] = rotation.apply(turned[:, start:start + chunk].T.contiguous()).T
    return matrix


@contextmanager
def rotated_weights(modules: list[torch.nn.Module], rotation: Rotation):
    """Within: each module (all reading one input) holds W R^T, the weight its codes are taken from. On exit R is
    folded back into the weight (now W' R, W' what the quantizer left), in float32 math, stored in the weight's dtype."""
    turned = []
    try:
        for module in modules:
            weight = module.weight.data
            module.weight.data = rotation.apply(weight.float()).to(weight.dtype)
            turned.append(module)
        yield
    finally:
        for module in turned:
            weight = module.weight.data
            module.weight.data = rotation.invert(weight.float()).to(weight.dtype)
