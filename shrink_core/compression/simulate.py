"""What-if simulations that are not weights: int8 activations on a module's input, quantized KV cache (k/v outputs).

They run as forward hooks, so they vanish when the model is saved; `plan.yaml` beside a candidate records them and
`attach_simulation_` puts them back on a reloaded model.
"""
from __future__ import annotations

from shrink_core.compression.primitives import fake_quantize_activation, fake_quantize_groups

HOOKS_ATTRIBUTE = "_shrink_simulation_hooks"


def attach_simulation_(model, resolved) -> int:
    """Add the activation / KV-cache hooks the resolved plan asks for; returns how many were added."""
    detach_simulation_(model)
    modules = dict(model.named_modules())
    handles = []
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    for row in resolved:
        module = modules.get(row.name)
        if module is None or row.removed:
            continue
        if row.activation_bits:
            bits = row.activation_bits
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, bits=bits: (fake_quantize_activation(args[0], bits),) + tuple(args[1:])))
        if row.kv_cache_bits and row.kind in ("k", "v"):
            bits = row.kv_cache_bits
            # per token and head, asymmetric; K is quantized before RoPE here (an approximation, said so in docs)
            handles.append(module.register_forward_hook(
                lambda mod, args, out, bits=bits: fake_quantize_groups(out, bits, head_dim)))
    setattr(model, HOOKS_ATTRIBUTE, handles)
    return len(handles)


def detach_simulation_(model) -> None:
    for handle in getattr(model, HOOKS_ATTRIBUTE, []):
        handle.remove()
    setattr(model, HOOKS_ATTRIBUTE, [])
