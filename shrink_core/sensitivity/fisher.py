"""The fast estimate: every module x setting from one forward (and one or two backwards) per calibration batch.

Per calibration sequence s, the gradient of its summed NLL with respect to a linear's weight is G_s = g_s^T x_s
(out, in), built from the layer's input x_s (T, in) and output gradient g_s (T, out) caught by hooks; parameters
need no .grad at all. Second order around the unperturbed model, with the diagonal Fisher F = sum_s G_s**2
standing in for the Hessian:

    KL  ~= sum(F * dW**2) / (2 N)           dNLL ~= sum(G * dW) / N + KL        (N = scored tokens)

with dW = Q(W) - W for each setting. F uses labels sampled from the model's own next-token distribution (the true
Fisher, whose expectation is the Hessian of KL); with the text's labels (empirical Fisher) rank agreement with
exhaustive KL was lower (en: 0.94 vs 0.975, fast budget). Sampled labels have no first-order term (E[G] = 0), so
G comes from a second backward over the same forward with the text's labels (`first_order=True`); without it the
fast dNLL is its second-order part (= the KL estimate). Quantization error is close to independent noise across
weights, which is what makes the diagonal a fair stand-in; docs/sensitivity.md has the estimators compared.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from shrink_core.sensitivity.settings import Setting, perturbed


@dataclass(frozen=True)
class FisherStats:
    fisher: dict[str, torch.Tensor]  # name -> (out, in) sum over sequences of G_s**2
    gradient: dict[str, torch.Tensor]  # name -> (out, in) sum of G_s with the text's labels; empty if not gathered
    tokens: int
    seconds: float
    labels: str = "sampled"


def per_sequence_gradient(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Weight gradient of each sequence: (B, out, in) from inputs (B, T, in) and output gradients (B, T, out)."""
    return torch.einsum("bto,bti->boi", g, x)


def fisher_stats(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], batch: int = 4,
                 progress=None, labels: str = "sampled", seed: int = 0, first_order: bool = False) -> FisherStats:
    """Accumulate F (and G) for `modules` over calibration ids (n, T); the model's weights are not changed.
    labels="data": the text's next tokens for both (empirical Fisher); "sampled": one draw per position from the
    model's own next-token distribution for F (the true Fisher, whose expectation is KL's Hessian), and with
    `first_order` a second backward over the same forward with the text's labels for G."""
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
    gather_gradient = labels == "data" or first_order
    gradient = ({n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
                if gather_gradient else {})
    phase = {"fisher": True, "gradient": labels == "data"}  # what the running backward accumulates

    def hook(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()

            def backward_hook(g):
                g = g.detach()
                if phase["fisher"]:
                    per_sequence = per_sequence_gradient(x, g)  # (B, out, in)
                    for one in per_sequence:  # in place: no (B, out, in) temporary for the squares
                        fisher[name].addcmul_(one, one)
                if phase["gradient"]:
                    gradient[name].add_(torch.einsum("bto,bti->oi", g, x))  # (out, in): summed over the batch
            output.register_hook(backward_hook)
        return forward_hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        for p in flags:
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        for done, start in enumerate(range(0, ids.shape[0], batch)):
            part = ids[start:start + batch]
            with torch.enable_grad():
                inputs = embed(part).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, use_cache=False).logits[:, :-1].float()
                flat = logits.reshape(-1, logits.shape[-1])  # (B * (T - 1), vocab)
                text = part[:, 1:].reshape(-1)
                if labels == "sampled":
                    drawn = torch.multinomial(torch.softmax(flat.detach(), -1), 1, generator=generator)[:, 0]
                    phase.update(fisher=True, gradient=False)
                    torch.nn.functional.cross_entropy(flat, drawn, reduction="sum").backward(retain_graph=first_order)
                    if first_order:  # same forward, second backward: the text's first-order term only
                        phase.update(fisher=False, gradient=True)
                        torch.nn.functional.cross_entropy(flat, text, reduction="sum").backward()
                else:
                    torch.nn.functional.cross_entropy(flat, text, reduction="sum").backward()
            if progress:
                progress(min(1.0, (start + batch) / ids.shape[0]), f"gradients: batch {done + 1}")
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return FisherStats(fisher, gradient, tokens, time.perf_counter() - started, labels)


def estimate_slices(weight: torch.Tensor, stats: list[FisherStats], name: str, setting: Setting) -> list[tuple[float, float]]:
    """(kl, dnll) for one module under `setting` from several slices' statistics; the weight error is computed once."""
    with torch.no_grad():
        weight = weight.detach()
        delta = (perturbed(setting, weight) - weight).reshape(-1)  # (out * in,)
        squared = delta * delta
        out = []
        for stat in stats:
            kl = float(torch.dot(stat.fisher[name].reshape(-1), squared)) / (2 * stat.tokens)
            # the first-order term needs the text's own labels; without them dNLL is its second-order part
            first = float(torch.dot(stat.gradient[name].reshape(-1), delta)) / stat.tokens if stat.gradient else 0.0
            out.append((kl, first + kl))
    return out
