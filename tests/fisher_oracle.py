"""Kept statistics for tests: F and G summed over the calibration sequences (4 bytes a weight each) from the
product's own passes (`fisher._passes`), and the estimates read off them. The product streams instead
(`fisher.fisher_scores`, nothing the size of the weights kept); these are what its figures must equal."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from shrink_core.sensitivity import fisher as fisher_module
from shrink_core.sensitivity.settings import Setting, perturbed


@dataclass(frozen=True)
class Kept:
    fisher: dict[str, torch.Tensor]  # sum_s G_s**2, labels sampled from the model (the true Fisher)
    gradient: dict[str, torch.Tensor]  # sum_s G_s, the text's labels; empty without first_order
    empirical: dict[str, torch.Tensor]  # sum_s G_s**2, the text's labels (empirical Fisher); empty without first_order
    tokens: int


def kept_statistics(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], batch: int = 4,
                    first_order: bool = False, seed: int = 0) -> Kept:
    def zeros():
        return {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}

    fisher, gradient, empirical = zeros(), zeros() if first_order else {}, zeros() if first_order else {}

    def on_gradient(name, x, g):
        gradient[name].add_(torch.einsum("bto,bti->oi", g, x))
        empirical[name].add_(fisher_module._squares(x, g))

    fisher_module._passes(model, ids, modules, lambda n, x, g: fisher[n].add_(fisher_module._squares(x, g)),
                          on_gradient, batch, None, seed, first_order)
    return Kept(fisher, gradient, empirical, ids.shape[0] * (ids.shape[1] - 1))


def estimate(weight: torch.Tensor, f: torch.Tensor, g: torch.Tensor | None, tokens: int,
             setting: Setting) -> tuple[float, float]:
    """(kl, dnll) of one module under `setting`: KL = sum(F dW**2) / 2N, dNLL = sum(G dW) / N + KL."""
    weight = weight.detach().float()
    delta = perturbed(setting, weight) - weight
    kl = float((f * delta.square()).sum()) / (2 * tokens)
    return kl, (float((g * delta).sum()) / tokens if g is not None else 0.0) + kl
