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

import statistics
import time
from dataclasses import dataclass

import torch

from shrink_core.compression.primitives import chunk_rows
from shrink_core.model.arch import recomputed_blocks
from shrink_core.perf.footprint import STACK_BYTES  # a batch's G_s (B, out, in) are stacked below it, else made one by one
from shrink_core.sensitivity.settings import Setting, row_independent, weight_error


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
    """Bytes of one float32 value per weight of these modules (two with `first_order`): what a batch's held
    gradients take (`fisher_scores(hold_gradients=True)`), or a kept F and G."""
    return sum(m.weight.numel() for m in modules.values()) * 4 * (2 if first_order else 1)


def _squares(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """sum_s G_s**2 (out, in), one sequence at a time: no (B, out, in) temporary."""
    squares = torch.zeros(g.shape[-1], x.shape[-1], device=g.device)
    for b in range(x.shape[0]):
        one = g[b].T @ x[b]  # G_s (out, in)
        squares.addcmul_(one, one)
    return squares


def _passes(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], on_fisher, on_gradient, batch: int,
            progress, seed: int, first_order: bool, soft_targets=None, gradient_first: bool = False,
            recompute: bool = False) -> None:
    """Forward and backward passes over `ids` in batches. Per batch and module, on_fisher(name, x, g) in the backward
    with labels sampled from the model (the Fisher) and on_gradient(name, x, g) in the one with the text's labels
    (the first-order gradient; only with `first_order`): x (B, T, in) the module's inputs and g (B, T, out) its
    output gradients, float32; the consumer reduces them.
    soft_targets(part) -> (B * (T - 1), vocab) probabilities: the first-order backward is then the gradient of the
    cross-entropy to them (KL(targets || model) up to a constant) instead of the text's NLL. `gradient_first`: the
    first-order backward runs before the sampled one, so a consumer can hold a module's batch gradient until its
    Fisher arrives and reduce both against one weight error (same draws, same figures). `recompute`: each block's
    activations are recomputed in each backward instead of kept (`arch.recomputed_blocks`: the same bits)."""
    generator = torch.Generator().manual_seed(seed)
    phase = {"fisher": True, "gradient": False}  # what the running backward accumulates

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
                if phase["fisher"]:
                    on_fisher(name, x_, g_)
                if phase["gradient"]:
                    on_gradient(name, x_, g_)
            output.register_hook(backward_hook)
        return forward_hook

    flags = {p: p.requires_grad for p in model.parameters()}
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    with recomputed_blocks(model, recompute):
        try:
            for p in flags:
                p.requires_grad_(False)
            embed = model.get_input_embeddings()
            device = embed.weight.device
            for done, start in enumerate(range(0, ids.shape[0], batch)):
                part = ids[start:start + batch].to(device)
                phase["shape"] = tuple(part.shape)
                with torch.enable_grad():
                    inputs = embed(part).detach().requires_grad_(True)
                    logits = model(inputs_embeds=inputs, use_cache=False).logits[:, :-1].float()
                    flat = logits.reshape(-1, logits.shape[-1])  # (B * (T - 1), vocab)
                    text = part[:, 1:].reshape(-1, 1)
                    # drawn on the CPU from one generator whatever the device: the same labels as a CPU run
                    drawn = torch.multinomial(torch.softmax(flat.detach(), -1).cpu(), 1, generator=generator).to(device)
                    # both losses read one log-softmax (cross-entropy's own, the same gradients): one (positions, vocab)
                    # float32 tensor kept for the second backward, not two, and the logits themselves are not kept
                    logp = torch.log_softmax(flat, -1)
                    del logits, flat
                    steps = [("fisher", -logp.gather(1, drawn).sum())]
                    if first_order:  # same forward, another backward: the first-order term only
                        first = (-logp.gather(1, text).sum() if soft_targets is None
                                 else -(soft_targets(part).to(logp.dtype) * logp).sum())
                        steps.insert(0 if gradient_first else 1, ("gradient", first))
                    del logp
                    for i, (which, loss) in enumerate(steps):
                        phase.update(fisher=which == "fisher", gradient=which == "gradient")
                        loss.backward(retain_graph=i < len(steps) - 1)
                if progress:
                    progress(min(1.0, (start + batch) / ids.shape[0]), f"gradients: batch {done + 1}")
        finally:
            for handle in handles:
                handle.remove()
            for p, flag in flags.items():
                p.requires_grad_(flag)


# The fast scan's cap on one calibration sequence's estimate, in medians of the sequences' (docs/sensitivity.md).
ROBUST_CAP = 10.0


def winsorized_sum(values, cap: float) -> tuple[float, int]:
    """The sum of per-sequence estimates with each capped at `cap` times the median of the positive ones, and how
    many were capped. The local quadratic overshoots a saturating KL on a fragile sequence: on ru, one of 8
    calibration sequences carried block 0's v_proj at W3 g64 to 36.7 against 0.03-0.08 on the others, and a plain
    sum let that one sequence decide the slice's ranking. Fewer than 3 positive values (an expert that few
    sequences route to) are summed as they are."""
    positive = [v for v in values if v > 0]
    if len(positive) < 3:
        return float(sum(values)), 0
    limit = cap * statistics.median(positive)
    return float(sum(min(v, limit) for v in values)), sum(v > limit for v in values)


@dataclass(frozen=True)
class FisherScores:
    values: dict[str, dict[str, tuple[float, float]]]  # setting id -> module -> (kl, dnll)
    tokens: int
    seconds: float
    capped: int = 0  # per-sequence estimates the robust cap lowered (all modules and settings)


def fisher_scores(model, ids: torch.Tensor, modules: dict[str, torch.nn.Module], settings: list[Setting],
                  batch: int = 4, progress=None, seed: int = 0, first_order: bool = True, errors=None,
                  soft_targets=None, quadratic: str = "diagonal", robust: float | None = None,
                  hold_gradients: bool = False, recompute: bool = False) -> FisherScores:
    """(kl, dnll) per setting and module in bounded memory: each batch's F and G of a module are reduced at once
    against every setting's weight error and dropped, so nothing the size of the weights outlives a module's hook
    (the price: each setting's weight error is recomputed per batch and pass, or once with `hold_gradients`).
    errors(name) -> (key, dW) pairs replaces "each setting's error from the module's weight" (`sensitivity.local`
    scores moves away from a plan); each dW must be a new tensor: the scorer squares it in place.
    soft_targets: see `_passes`.
    quadratic="diagonal": dW . F dW with F's diagonal (sum F * dW**2); "sequence": with the whole F, as its unbiased
    estimate sum_s <G_s, dW>**2 (one sampled-label gradient per sequence). The diagonal is the lower-variance choice
    for errors that are close to independent noise (RTN); an error shaped against the input correlations (GPTQ's)
    sits in directions the diagonal cannot see.
    robust=C: each sequence's quadratic term is kept apart and the sum caps each at C times their median
    (`winsorized_sum`). hold_gradients: the first-order backward runs first and each module's batch gradient (4 bytes
    a weight over all modules) waits for its Fisher, so each weight error is computed once per batch, not twice.
    recompute: the blocks' activations are recomputed in the backwards, not kept (`_passes`): the same figures."""
    if quadratic not in ("diagonal", "sequence"):
        raise ValueError(f"quadratic is 'diagonal' or 'sequence', not {quadratic!r}")
    started = time.perf_counter()
    keys = [s.id for s in settings] if errors is None else None
    sums: dict[str, dict[str, list]] = {}  # key -> module -> [sum dW F dW, sum G dW, per-sequence dW F_s dW]
    held: dict[str, torch.Tensor] = {}  # module -> this batch's first-order gradient, until its Fisher pass
    hold = hold_gradients and first_order

    def setting_errors(name):
        weight = modules[name].weight.detach()
        for s in settings:
            yield s.id, weight_error(s, weight)

    given = errors is not None
    errors = errors or setting_errors

    def slot(key, name):
        return sums.setdefault(key, {}).setdefault(name, [0.0, 0.0, []])

    def sequence_parts(x, g, delta) -> torch.Tensor:
        """(B,) per sequence, from its G_s made one at a time (a batch of them at once is B x (out, in) float32, 2 GB
        for 8 sequences of an 8B gate_proj): sum G_s**2 dW**2 for the diagonal (dW squared in place: the caller's own
        error, see on_fisher), or <G_s, dW> for "sequence" (squared once summed over any row blocks)."""
        squared = delta.square_() if quadratic == "diagonal" else None
        parts = []
        for b in range(x.shape[0]):
            one = g[b].T @ x[b]
            parts.append((one.square_().mul_(squared) if squared is not None else one.mul_(delta)).sum())
            del one
        return torch.stack(parts)

    def sequence_terms(x, g, delta, stack) -> torch.Tensor:
        """(B,) each sequence's dW . F_s dW: diagonal, or <G_s, dW>**2 (stack: the batch's G_s, squared for the
        diagonal; None: each G_s made again, for a batch of large modules)."""
        if stack is not None:
            flat = stack.reshape(stack.shape[0], -1)
            return flat @ delta.reshape(-1).square() if quadratic == "diagonal" else (flat @ delta.reshape(-1)).square()
        parts = sequence_parts(x, g, delta)
        return parts if quadratic == "diagonal" else parts.square()

    def row_blocks(name):
        """The module's rows, a float32 ROW_CHUNK_BYTES block at a time, where every setting treats rows on their own
        and the errors are the settings' own: each block's errors are then made and reduced alone, and nothing the
        size of the weight exists (two such tensors were 0.47 GB at an 8B gate_proj's peak). None otherwise."""
        weight = modules[name].weight
        if given or not all(row_independent(s, weight) for s in settings):
            return None
        step = chunk_rows(weight.shape[1])
        return [slice(start, start + step) for start in range(0, weight.shape[0], step)]

    def fisher_by_rows(name, x, g, gradient, blocks):
        """on_fisher's per-sequence terms (and the held first-order term) summed over row blocks: each sequence's
        G_s block by block against each setting's error on the block."""
        weight = modules[name].weight.detach()
        sums_ = {s.id: torch.zeros(x.shape[0], dtype=torch.float64, device=g.device) for s in settings}
        first = dict.fromkeys(sums_, 0.0)
        for rows in blocks:
            for s in settings:
                delta = weight_error(s, weight[rows])
                if gradient is not None:  # read before sequence_parts squares the error in place
                    first[s.id] += float(torch.dot(gradient.view(weight.shape)[rows].reshape(-1),
                                                   delta.reshape(-1)))
                sums_[s.id] += sequence_parts(x, g[..., rows], delta)
        for s in settings:
            terms = sums_[s.id] if quadratic == "diagonal" else sums_[s.id].square()
            slot_ = slot(s.id, name)
            slot_[0] += float(terms.sum())
            slot_[1] += first[s.id]
            slot_[2].extend(terms.tolist())

    def on_fisher(name, x, g):
        apart = robust is not None or quadratic == "sequence"
        gradient = held.pop(name, None)
        squares = stack = None
        stackable = x.shape[0] * g.shape[-1] * x.shape[-1] * 4 <= STACK_BYTES
        blocks = row_blocks(name) if apart and not stackable else None
        if blocks is not None:
            return fisher_by_rows(name, x, g, gradient, blocks)
        if not apart:
            squares = _squares(x, g).reshape(-1)
        elif stackable:
            stack = per_sequence_gradient(x, g)
            stack = stack.square_() if quadratic == "diagonal" else stack
        # each error is a new tensor of ours (`errors` yields fresh ones): the first-order term reads it first, then
        # the quadratic one may square it in place, one (out, in) float32 copy fewer at the peak
        for key, delta in errors(name):
            s = slot(key, name)
            if gradient is not None:
                s[1] += float(torch.dot(gradient, delta.reshape(-1)))
            if apart:
                terms = sequence_terms(x, g, delta, stack)
                s[0] += float(terms.sum())
                s[2].extend(terms.tolist())
            else:
                s[0] += float(torch.dot(squares, delta.reshape(-1).square()))

    def on_gradient(name, x, g):
        blocks = None if hold else row_blocks(name)
        if blocks is not None:  # the batch's gradient a block of rows at a time, against each setting's error there
            weight = modules[name].weight.detach()
            for rows in blocks:
                part = torch.einsum("bto,bti->oi", g[..., rows], x).reshape(-1)
                for s in settings:
                    slot(s.id, name)[1] += float(torch.dot(part, weight_error(s, weight[rows]).reshape(-1)))
            return
        gradient = torch.einsum("bto,bti->oi", g, x).reshape(-1)  # (out * in): summed over the batch
        if hold:
            held[name] = gradient
            return
        for key, delta in errors(name):
            slot(key, name)[1] += float(torch.dot(gradient, delta.reshape(-1)))

    _passes(model, ids, modules, on_fisher, on_gradient, batch, progress, seed, first_order, soft_targets,
            gradient_first=hold, recompute=recompute)
    tokens = ids.shape[0] * (ids.shape[1] - 1)
    for key in keys or []:  # every setting of every module has a value, even with no pass over it
        for name in modules:
            slot(key, name)
    values, capped = {}, 0
    for sid, per in sums.items():
        values[sid] = {}
        for n, (f, g, terms) in per.items():
            if robust is not None:
                f, count = winsorized_sum(terms, robust)
                capped += count
            values[sid][n] = (f / (2 * tokens), g / tokens + f / (2 * tokens))
    return FisherScores(values, tokens, time.perf_counter() - started, capped)
