"""Calibration plumbing: run token batches up to the first block, then block by block, collecting X^T X per input.

Inputs (`hidden`) are kept per batch, with the keyword arguments the decoder layer needs (position embeddings, mask).
"""
from __future__ import annotations

import torch

from shrink_core.model.arch import decoder_layers, first_block_input, run_layer

# Which modules share an input: q/k/v (or a fused qkv) read the same tensor, and so do gate/up.
INPUT_SOURCE = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "o", "gate": "mlp", "up": "mlp",
                "gate_up": "mlp", "down": "down"}


def input_source(name: str, kind: str) -> str:
    """The input a module reads, unique within a block: its parent's path plus the source of its kind, so that each
    expert of an MoE layer (and a shared expert) has its own statistics; an unknown kind reads its own input."""
    parent = name.rsplit(".", 1)[0]
    return f"{parent}:{INPUT_SOURCE[kind]}" if kind in INPUT_SOURCE else name


def token_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    if tokens.dim() != 2 or tokens.dtype != torch.long:
        raise ValueError("calibration tokens must be a LongTensor (n_sequences, seq_len)")
    return list(tokens.split(batch_size))


def first_block_inputs(model, tokens: torch.Tensor, batch_size: int = 8) -> list[tuple[torch.Tensor, dict]]:
    """(hidden (batch, seq, hidden), layer kwargs) per batch, captured at the first decoder block."""
    return [first_block_input(model, batch) for batch in token_batches(tokens, batch_size)]


def run_block(layer, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    return [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in inputs]


class HessianHooks:
    """Accumulate H = sum x x^T (in, in) for each input source of one block while it runs."""

    def __init__(self, modules: dict[str, torch.nn.Linear], diagonal_only: set[str] = frozenset()):
        self.hessians: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles = []
        for source, linear in modules.items():
            self._handles.append(linear.register_forward_hook(self._hook(source, source in diagonal_only)))

    def _hook(self, source: str, diagonal: bool):
        def hook(module, args, output):
            x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            update = x.pow(2).sum(dim=0) if diagonal else x.T @ x  # (in,) or (in, in)
            self.hessians[source] = self.hessians.get(source, 0) + update
            self.tokens[source] = self.tokens.get(source, 0) + x.shape[0]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def collect(layer, inputs, modules: dict[str, torch.nn.Linear], diagonal_only: set[str] = frozenset()):
    """Run a block over its inputs with hooks; returns (hessians by source, outputs)."""
    hooks = HessianHooks(modules, diagonal_only)
    try:
        outputs = run_block(layer, inputs)
    finally:
        hooks.remove()
    return hooks.hessians, outputs


def input_sq_sums(model, tokens: torch.Tensor, kinds: tuple[str, ...] = ("o", "down"), batch_size: int = 8):
    """Per block and kind, the sum of squared inputs per feature (in,): one full forward over the calibration set."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for block, layer in enumerate(decoder_layers(model)):
        for kind in kinds:
            linear = layer.self_attn.o_proj if kind == "o" else layer.mlp.down_proj

            def hook(module, args, output, key=(block, kind)):
                x = args[0].reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                sums[key] = sums.get(key, 0) + x.pow(2).sum(dim=0)

            handles.append(linear.register_forward_hook(hook))
    try:
        for batch in token_batches(tokens, batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums
