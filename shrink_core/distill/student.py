"""Students: block influence, teacher-derived students (blocks dropped, MLP width pruned) and their projected size.

Block influence (ShortGPT's Block Influence) = 1 - cos(h_in, h_out) of each block, averaged over the tokens of the
calibration data: a block that barely turns its input is the cheapest to drop.
"""
from __future__ import annotations

import copy

import torch

from shrink_core.errors import ShrinkError
from shrink_core.model.arch import decoder_layers


def cosine_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token 1 - cos(h_in, h_out); (batch, seq, hidden) x2 -> (batch, seq)."""
    return 1 - torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)


def block_influence(model, tokens: torch.Tensor, batch_size: int = 4) -> list[float]:
    """Mean 1 - cos(input, output) of every decoder block over `tokens` (n, seq_len); one float per block."""
    layers = list(decoder_layers(model))
    sums = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    captured: dict[int, torch.Tensor] = {}

    def hook(index):
        def capture(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            captured[index] = cosine_influence(h_in, h_out).sum().double()
        return capture

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, tokens.shape[0], batch_size):
                batch = tokens[start:start + batch_size].to(device)
                model(input_ids=batch, use_cache=False)
                for index, value in captured.items():
                    sums[index] += value.cpu()
                count += batch.numel()
    finally:
        for handle in handles:
            handle.remove()
    return (sums / max(count, 1)).tolist()


def lowest_influence(influence: list[float], count: int, keep_first: bool = True) -> tuple[int, ...]:
    """The `count` blocks with the lowest influence (block 0 kept by default: it turns embeddings into states)."""
    candidates = [i for i in range(len(influence)) if not (keep_first and i == 0)]
    if not 0 < count < len(influence):
        raise ShrinkError(f"Cannot drop {count} of {len(influence)} blocks; drop between 1 and {len(influence) - 1}.")
    return tuple(sorted(sorted(candidates, key=lambda i: (influence[i], i))[:count]))


def student_plan(drop_blocks: tuple[int, ...], mlp_prune: float) -> dict | None:
    """The structured-pruning plan that turns the teacher into the student (None when nothing is removed)."""
    rules = []
    if drop_blocks:
        rules.append({"blocks": list(drop_blocks), "prune": {"structure": "blocks"},
                      "note": "dropped for distillation"})
    if mlp_prune:
        rules.append({"kind": ["gate", "up", "down"], "prune": {"structure": "channels", "amount": float(mlp_prune)}})
    if not rules:
        return None
    return {"version": 1, "name": "distill student", "rules": rules}


def build_student(teacher, drop_blocks: tuple[int, ...] = (), mlp_prune: float = 0.0):
    """A copy of the teacher with blocks removed and MLP channels pruned (weights kept from the teacher)."""
    blocks = len(decoder_layers(teacher))
    bad = [b for b in drop_blocks if not 0 <= b < blocks]
    if bad:
        raise ShrinkError(f"Block {bad[0]} does not exist; the teacher has blocks 0 to {blocks - 1}.")
    if len(set(drop_blocks)) >= blocks:
        raise ShrinkError("The student must keep at least one block.")
    student = copy.deepcopy(teacher)
    plan = student_plan(tuple(drop_blocks), mlp_prune)
    if plan is not None:
        from shrink_core.compression.apply import apply_plan_

        apply_plan_(student, plan)
    for param in student.parameters():
        param.requires_grad_(True)
    return student, plan


def kept_blocks(total: int, drop_blocks: tuple[int, ...]) -> list[int]:
    """Teacher index of each student block, in order."""
    return [i for i in range(total) if i not in set(drop_blocks)]


def parameter_count(model) -> int:
    """Parameters, tied weights counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def projected_shape(config, drop_blocks: tuple[int, ...] | int = (), mlp_prune: float = 0.0) -> dict:
    """Parameter count and fp32 / bf16 bytes of a Llama student, computed from shapes alone (projected, not measured)."""
    from shrink_core.compression.prune import kept_channels

    hidden, vocab = config.hidden_size, config.vocab_size
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    dropped = drop_blocks if isinstance(drop_blocks, int) else len(set(drop_blocks))
    blocks = config.num_hidden_layers - dropped
    width = kept_channels(config.intermediate_size, mlp_prune) if mlp_prune else config.intermediate_size
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    per_block = attention + 3 * hidden * width + 2 * hidden
    embedding = vocab * hidden
    head = 0 if getattr(config, "tie_word_embeddings", False) else vocab * hidden
    params = blocks * per_block + embedding + head + hidden
    return {"blocks": blocks, "mlp_width": width, "params": params, "fp32_bytes": 4 * params, "bf16_bytes": 2 * params,
            "source": "projected from shapes (not measured)"}


# ---------------------------------------------------------------- quantized students: straight-through estimator


class FakeQuant(torch.nn.Module):
    """Weight parametrization: the forward sees round-to-nearest weights, the gradient passes straight through."""

    def __init__(self, bits: int, group_size: int | None, symmetric: bool, scales: str = "fp16"):
        super().__init__()
        self.bits, self.group_size, self.symmetric, self.scales = bits, group_size, symmetric, scales

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        from shrink_core.compression.primitives import dequantize, quantize, scale_zero

        with torch.no_grad():
            scale, zero = scale_zero(weight, self.bits, self.group_size, self.symmetric,  # (out, groups)
                                     scales=self.scales)
            snapped = dequantize(quantize(weight, scale, zero, self.bits, self.group_size), scale, zero,
                                 self.group_size, weight.dtype)  # (out, in)
        return weight + (snapped - weight).detach()


def attach_straight_through_(model, plan_dict: dict) -> int:
    """Fake-quantize every linear the candidate's plan quantized (by rule, on the student as it is); returns the count."""
    from torch.nn.utils import parametrize

    from shrink_core.plan import load_plan, resolve

    try:
        resolved = resolve(model, load_plan(plan_dict))
    except ShrinkError as exc:
        raise ShrinkError(f"The candidate's plan does not resolve on its own saved model, so its quantized modules "
                          f"cannot be kept on a grid while training ({exc}).") from None
    modules = dict(model.named_modules())
    attached = 0
    for row in resolved:
        weights = row.weights
        module = modules.get(row.name)
        if weights is None or weights.is_float or row.removed or row.tied_to or module is None:
            continue
        if not isinstance(module, torch.nn.Linear):
            continue
        if weights.ggml is not None:
            raise ShrinkError(f"{row.name}: training on llama.cpp's {weights.ggml} grid is not supported; distil to an "
                              "integer format (bits, group_size) and choose llama.cpp types in a plan afterwards.")
        parametrize.register_parametrization(module, "weight",
                                             FakeQuant(weights.bits, weights.group_size, weights.symmetric,
                                                       weights.scales))
        attached += 1
    return attached


def detach_straight_through_(model) -> None:
    """Bake the fake-quantized (on-grid) weights in and remove the parametrizations."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
