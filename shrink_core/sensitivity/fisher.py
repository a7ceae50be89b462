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


def _to_sequences(values: torch.Tensor, tokens: torch.Tensor | None, shape: tuple[int, int]) -> torch.Tensor:
    """(B, T, d) from the rows (N, d) of the flat positions `tokens` (others zero), so an expert's per-sequence
    gradient is the same einsum as a dense module's."""
    if tokens is None:
        return values.reshape(shape[0], shape[1], -1)
    out = values.new_zeros(shape[0] * shape[1], values.shape[-1])
    out[tokens] = values
    return out.reshape(shape[0], shape[1], -1)


def stats_bytes(modules: dict[str, torch.nn.Module], first_order: bool = True) -> int:
    """Bytes `fisher_stats` keeps for these modules: F (and G) in float32, one value per weight."""
    return sum(m.weight.numel() for m in modules.values()) * 4 * (2 if first_order else 1)


def _passes(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], on_fisher, on_gradient, batch: int,
            progress, labels: str, seed: int, first_order: bool, soft_targets=None, per_sequence: bool = False) -> None:
    """Forward and backward passes over `ids` in batches; per batch and module, on_fisher(name, sum_s G_s**2) and
    on_gradient(name, sum_s G_s) (both (out, in) float32) receive that batch's contribution; with `per_sequence`,
    on_fisher receives the batch's G_s themselves, (B, out, in).
    soft_targets(part) -> (B * (T - 1), vocab) probabilities: the first-order backward is then the gradient of the
    cross-entropy to them (KL(targets || model) up to a constant) instead of the text's NLL."""
    generator = torch.Generator().manual_seed(seed)
    phase = {"fisher": True, "gradient": labels == "data"}  # what the running backward accumulates

    def hook(name):
        def forward_hook(module, inputs, output):
            x = inputs[0].detach()
            # 2-D input: an expert sees only the tokens routed to it, flattened over the batch (and OPT's MLP
            # flattens all of them)
            flat = x.dim() == 2
            routed = getattr(module, "routed_tokens", None)

            def backward_hook(g):
                g = g.detach()
                x_, g_ = (_to_sequences(t, routed, phase["shape"]) for t in (x, g)) if flat else (x, g)
                x_, g_ = x_.float(), g_.float()  # statistics in float32 whatever the model's dtype
                if phase["fisher"] and per_sequence:
                    on_fisher(name, torch.einsum("bto,bti->boi", g_, x_))
                elif phase["fisher"]:
                    squares = torch.zeros(g_.shape[-1], x_.shape[-1], device=g_.device)
                    for b in range(x_.shape[0]):  # one sequence at a time: no (B, out, in) temporary
                        one = g_[b].T @ x_[b]  # G_s (out, in)
                        squares.addcmul_(one, one)
                    on_fisher(name, squares)
                if phase["gradient"]:
                    on_gradient(name, torch.einsum("bto,bti->oi", g_, x_))  # (out, in): summed over the batch
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
            phase["shape"] = tuple(part.shape)
            with torch.enable_grad():
                inputs = embed(part).detach().requires_grad_(True)
                logits = model(inputs_embeds=inputs, use_cache=False).logits[:, :-1].float()
                flat = logits.reshape(-1, logits.shape[-1])  # (B * (T - 1), vocab)
                text = part[:, 1:].reshape(-1)
                if labels == "sampled":
                    drawn = torch.multinomial(torch.softmax(flat.detach(), -1), 1, generator=generator)[:, 0]
                    phase.update(fisher=True, gradient=False)
                    torch.nn.functional.cross_entropy(flat, drawn, reduction="sum").backward(retain_graph=first_order)
                    if first_order:  # same forward, second backward: the first-order term only
                        phase.update(fisher=False, gradient=True)
                        if soft_targets is None:
                            torch.nn.functional.cross_entropy(flat, text, reduction="sum").backward()
                        else:
                            target = soft_targets(part).to(flat.dtype)
                            (-(target * torch.log_softmax(flat, -1)).sum()).backward()
                else:
                    torch.nn.functional.cross_entropy(flat, text, reduction="sum").backward()
            if progress:
                progress(min(1.0, (start + batch) / ids.shape[0]), f"gradients: batch {done + 1}")
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags.items():
            p.requires_grad_(flag)


def fisher_stats(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], batch: int = 4,
                 progress=None, labels: str = "sampled", seed: int = 0, first_order: bool = False) -> FisherStats:
    """Accumulate F (and G) for `modules` over calibration ids (n, T); the model's weights are not changed.
    labels="data": the text's next tokens for both (empirical Fisher); "sampled": one draw per position from the
    model's own next-token distribution for F (the true Fisher, whose expectation is KL's Hessian), and with
    `first_order` a second backward over the same forward with the text's labels for G. Keeps 4 (8 with G) bytes
    per weight of the modules: `fisher_scores` gives the same estimates without keeping them."""
    started = time.perf_counter()
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
    gather_gradient = labels == "data" or first_order
    gradient = ({n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in modules.items()}
                if gather_gradient else {})
    _passes(model, ids, modules, lambda n, f: fisher[n].add_(f), lambda n, g: gradient[n].add_(g), batch, progress,
            labels, seed, first_order)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    return FisherStats(fisher, gradient, tokens, time.perf_counter() - started, labels)


@dataclass(frozen=True)
class FisherScores:
    values: dict[str, dict[str, tuple[float, float]]]  # setting id -> module -> (kl, dnll)
    tokens: int
    seconds: float


def fisher_scores(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], settings: list[Setting],
                  batch: int = 4, progress=None, seed: int = 0, first_order: bool = True, errors=None,
                  soft_targets=None, quadratic: str = "diagonal") -> FisherScores:
    """The estimates of `estimate_slices(..., fisher_stats(...))` in bounded memory: each batch's F and G of a module
    are reduced at once against every setting's weight error and dropped, so nothing the size of the weights
    outlives a module's hook (the price: each setting's weight error is recomputed per batch and pass).
    errors(name) -> (key, dW) pairs replaces "each setting's error from the module's weight" (`sensitivity.local`
    scores moves away from a plan); soft_targets: see `_passes`.
    quadratic="diagonal": dW . F dW with F's diagonal (sum F * dW**2); "sequence": with the whole F, as its unbiased
    estimate sum_s <G_s, dW>**2 (one sampled-label gradient per sequence). The diagonal is the lower-variance choice
    for errors that are close to independent noise (RTN); an error shaped against the input correlations (GPTQ's)
    sits in directions the diagonal cannot see."""
    if quadratic not in ("diagonal", "sequence"):
        raise ValueError(f"quadratic is 'diagonal' or 'sequence', not {quadratic!r}")
    started = time.perf_counter()
    keys = [s.id for s in settings] if errors is None else None
    sums: dict[str, dict[str, list[float]]] = {}  # key -> module -> (sum F dW^2, sum G dW)

    def setting_errors(name):
        weight = modules[name].weight.detach().float()
        for s in settings:
            yield s.id, perturbed(s, weight) - weight

    errors = errors or setting_errors

    def slot(key, name):
        return sums.setdefault(key, {}).setdefault(name, [0.0, 0.0])

    def on_fisher(name, stat):  # sum_s G_s**2 (out, in); with quadratic="sequence" the batch's G_s (B, out, in)
        for key, delta in errors(name):
            if quadratic == "sequence":
                slot(key, name)[0] += float(torch.einsum("boi,oi->b", stat, delta).square().sum())
            else:
                slot(key, name)[0] += float(torch.dot(stat.reshape(-1), delta.reshape(-1).square()))

    def on_gradient(name, gradient):
        for key, delta in errors(name):
            slot(key, name)[1] += float(torch.dot(gradient.reshape(-1), delta.reshape(-1)))

    _passes(model, ids, modules, on_fisher, on_gradient, batch, progress, "sampled", seed, first_order, soft_targets,
            per_sequence=quadratic == "sequence")
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    for key in keys or []:  # every setting of every module has a value, even with no pass over it
        for name in modules:
            slot(key, name)
    values = {sid: {n: (f / (2 * tokens), g / tokens + f / (2 * tokens)) for n, (f, g) in per.items()}
              for sid, per in sums.items()}
    return FisherScores(values, tokens, time.perf_counter() - started)


def estimate_slices(weight: torch.Tensor, stats: list[FisherStats], name: str, setting: Setting) -> list[tuple[float, float]]:
    """(kl, dnll) for one module under `setting` from several slices' statistics; the weight error is computed once."""
    with torch.no_grad():
        weight = weight.detach().float()
        delta = (perturbed(setting, weight) - weight).reshape(-1)  # (out * in,)
        squared = delta * delta
        out = []
        for stat in stats:
            kl = float(torch.dot(stat.fisher[name].reshape(-1), squared)) / (2 * stat.tokens)
            # the first-order term needs the text's own labels; without them dNLL is its second-order part
            first = float(torch.dot(stat.gradient[name].reshape(-1), delta)) / stat.tokens if stat.gradient else 0.0
            out.append((kl, first + kl))
    return out
