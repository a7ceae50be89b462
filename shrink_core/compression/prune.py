"""Pruning: mask math (magnitude, Wanda, N:M) and structured surgery that physically shrinks the model.

Masks are boolean keep-masks shaped like the weight (out, in); `True` keeps the weight. Structured pruning removes
attention heads (query heads, evenly within each KV group), MLP channels, or whole blocks, and updates the config so
the saved model reloads with its new shapes. SparseGPT-style pruning lives with GPTQ in `quant/obs.py`.
"""
from __future__ import annotations

import torch

from shrink_core.formats import CHANNEL_ALIGN, kept_channels, kept_heads_per_group  # noqa: F401
from shrink_core.model.arch import decoder_layers, set_decoder_layers

# ---------------------------------------------------------------- pure mask math


def magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep the largest |w| of the whole matrix, dropping `amount` of them (layer-wise threshold)."""
    scores = weight.abs().flatten()
    drop = int(round(scores.numel() * amount))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        mask[torch.topk(scores, drop, largest=False).indices] = False
    return mask.reshape(weight.shape)


def wanda_scores(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (out, in), from the per-input-feature sum of squared activations (in,)."""
    return weight.abs() * input_sq_sum.sqrt().unsqueeze(0)


def row_mask(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Drop the lowest-scoring `amount` of each output row (Wanda's per-output comparison group)."""
    drop = int(round(scores.shape[1] * amount))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if drop:
        mask.scatter_(1, torch.topk(scores, drop, dim=1, largest=False).indices, False)
    return mask


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every m consecutive input weights of each row."""
    rows, columns = scores.shape
    grouped = scores.reshape(rows, columns // m, m)  # (out, in // m, m)
    keep = torch.zeros_like(grouped, dtype=torch.bool)
    keep.scatter_(2, torch.topk(grouped, n, dim=2).indices, True)
    return keep.reshape(rows, columns)


def mask_for(weight: torch.Tensor, prune, input_sq_sum: torch.Tensor | None = None) -> torch.Tensor:
    """The keep-mask for a PruneSpec with criterion magnitude or wanda (needs input_sq_sum).

    A calibrated criterion without its statistics is refused: the caller decides (and says) what to do instead.
    """
    if prune.criterion == "wanda":
        if input_sq_sum is None:
            raise ValueError("wanda needs the input activation statistics (input_sq_sum); none were given.")
        scores = wanda_scores(weight, input_sq_sum)
        return nm_mask(scores, prune.n, prune.m) if prune.structure == "nm" else row_mask(scores, prune.amount)
    if prune.criterion != "magnitude":
        raise ValueError(f"mask_for computes magnitude and wanda masks, not {prune.criterion}.")
    if prune.structure == "nm":
        return nm_mask(weight.abs(), prune.n, prune.m)
    return magnitude_mask(weight, prune.amount)


# ---------------------------------------------------------------- structured surgery (in place)


def _shrink_linear_(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0, outputs) or columns (dim=1, inputs) `index` of a linear layer."""
    linear.weight = torch.nn.Parameter(linear.weight.data.index_select(dim, index).contiguous(), requires_grad=False)
    if dim == 0:
        linear.out_features = index.numel()
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.data[index].contiguous(), requires_grad=False)
    else:
        linear.in_features = index.numel()


def channel_scores(mlp, down_input_sq_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each MLP channel (intermediate,): calibrated = ||x_j|| * ||down[:, j]||, else weight norms."""
    down_norm = mlp.down_proj.weight.norm(dim=0)  # (intermediate,)
    if down_input_sq_sum is not None:
        return down_input_sq_sum.sqrt() * down_norm
    return mlp.gate_proj.weight.norm(dim=1) * mlp.up_proj.weight.norm(dim=1) * down_norm


def prune_mlp_channels_(mlp, amount: float, scores: torch.Tensor) -> int:
    """Remove the lowest-scoring channels from gate/up (outputs) and down (inputs); returns the kept width."""
    width = mlp.gate_proj.out_features
    keep = torch.topk(scores, kept_channels(width, amount)).indices.sort().values
    _shrink_linear_(mlp.gate_proj, keep, 0)
    _shrink_linear_(mlp.up_proj, keep, 0)
    _shrink_linear_(mlp.down_proj, keep, 1)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()
    return keep.numel()


def head_scores(attention, o_input_sq_sum: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each query head (heads,) from o_proj's input columns (calibrated) or their weight norms."""
    head_dim = attention.head_dim
    column = attention.o_proj.weight.norm(dim=0)  # (heads * head_dim,)
    if o_input_sq_sum is not None:
        column = column * o_input_sq_sum.sqrt()
    return column.reshape(-1, head_dim).pow(2).sum(dim=1)


def prune_heads_(attention, amount: float, scores: torch.Tensor) -> int:
    """Remove query heads evenly inside each KV group (GQA stays valid); returns the kept query-head count."""
    head_dim = attention.head_dim
    groups = attention.k_proj.out_features // head_dim
    per_group = scores.numel() // groups
    kept_per_group = kept_heads_per_group(per_group, amount)
    grouped = scores.reshape(groups, per_group)  # (kv_heads, heads per kv head)
    top = torch.topk(grouped, kept_per_group, dim=1).indices.sort(dim=1).values
    heads = (top + torch.arange(groups, device=top.device).unsqueeze(1) * per_group).flatten()  # (kept heads,)
    columns = (heads.unsqueeze(1) * head_dim + torch.arange(head_dim, device=top.device)).flatten()
    _shrink_linear_(attention.q_proj, columns, 0)
    _shrink_linear_(attention.o_proj, columns, 1)
    attention.num_key_value_groups = kept_per_group
    return heads.numel()


def supports_structured(layer) -> bool:
    """Head and channel pruning need separate q/k/v/o and gate/up/down projections (Llama-style blocks)."""
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    return (all(hasattr(attention, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim"))
            and all(isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")))


def remove_blocks_(model, blocks: set[int]) -> None:
    """Delete whole decoder blocks and renumber the rest (layer_idx drives the KV cache)."""
    layers = decoder_layers(model)
    kept = [layer for index, layer in enumerate(layers) if index not in blocks]
    set_decoder_layers(model, torch.nn.ModuleList(kept))
    for index, layer in enumerate(kept):
        for module in layer.modules():  # the block and its attention, whatever the family calls it
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = index
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [t for index, t in enumerate(config.layer_types) if index not in blocks]
    config.num_hidden_layers = len(kept)


def sync_config_(model) -> list[str]:
    """Write the pruned shapes into the config; returns a problem sentence per non-uniform shape (cannot save)."""
    config, layers = model.config, decoder_layers(model)
    problems = []
    if not all(supports_structured(layer) for layer in layers):
        return problems  # only blocks can have been removed: the layer count is already in the config
    widths = {layer.mlp.gate_proj.out_features for layer in layers}
    heads = {layer.self_attn.q_proj.out_features // layer.self_attn.head_dim for layer in layers}
    if len(widths) > 1:
        problems.append(f"MLP widths differ between blocks ({sorted(widths)}) and a Llama config holds one "
                        "intermediate_size; prune the same share of channels in every block to save the model.")
    if len(heads) > 1:
        problems.append(f"head counts differ between blocks ({sorted(heads)}) and a Llama config holds one "
                        "num_attention_heads; prune the same share of heads in every block to save the model.")
    if layers and len(widths) == 1:
        config.intermediate_size = widths.pop()
    if layers and len(heads) == 1:
        head_dim = layers[0].self_attn.head_dim
        config.head_dim = head_dim  # explicit, since hidden_size // heads no longer gives it
        config.num_attention_heads = heads.pop()
    return problems
