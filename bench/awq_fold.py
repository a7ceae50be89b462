"""AWQ-style activation-aware scaling folded into the preceding op, before a quantizer runs (issue 17's candidate).

For each block of a Llama-style model, three input groups get a per-channel scale s (in,):
  input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up_proj's rows -> down_proj.
The weights that read the group are multiplied by s along their inputs and the op before divides by it, so the
full-precision function is unchanged (up to float rounding) and only the quantization grid moves: channels with
large activations get a finer grid. s = mean|x|^alpha (normalised by sqrt(max * min)), alpha from a 20-point grid
minimising the group's output error after round-to-nearest quantization at the target format (AWQ's search), on the
full-precision model's own block inputs. The quantizer (RTN, GPTQ, gptq-seq) then runs on the folded model.
"""
from __future__ import annotations

import time

import torch

from shrink_core.compression import calibrate
from shrink_core.compression.primitives import fake_quantize
from shrink_core.model.arch import block_kwargs, decoder_layers

GRID = 20


def search_scale(x: torch.Tensor, weight: torch.Tensor, bits: int, group_size: int,
                 grid: int = GRID) -> tuple[torch.Tensor, float, float, float]:
    """(s, alpha, error at alpha, error at alpha 0) for inputs x (tokens, in) and the group's stacked weight (out, in):
    the mean squared output error of RTN at (bits, group_size) on the scaled weight, unscaled after."""
    mean = x.abs().mean(dim=0).clamp(min=1e-4)
    reference = x @ weight.T
    best = (float("inf"), None, 0.0)
    base = None
    for step in range(grid):
        alpha = step / grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        q = fake_quantize(weight * s, bits, group_size, symmetric=False) / s
        error = (x @ q.T - reference).pow(2).mean().item()
        if step == 0:
            base = error
        if error < best[0]:
            best = (error, s, alpha)
    return best[1], best[2], best[0], base


def _groups(layer):
    attn, mlp = layer.self_attn, layer.mlp
    return [("attn", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]),
            ("mlp", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]),
            ("down", mlp.up_proj, [mlp.down_proj])]


def fold_(previous: torch.nn.Module, linears: list[torch.nn.Linear], s: torch.Tensor) -> None:
    """Multiply the readers' input columns by s; divide the op before it (a norm's weight, or a linear's rows)."""
    for linear in linears:
        linear.weight.mul_(s.to(linear.weight.dtype))
    if isinstance(previous, torch.nn.Linear):
        previous.weight.div_(s[:, None].to(previous.weight.dtype))
        if previous.bias is not None:
            previous.bias.div_(s.to(previous.bias.dtype))
    else:  # an RMSNorm / LayerNorm with an elementwise weight: y = norm(x) * weight
        if getattr(previous, "bias", None) is not None:
            previous.bias.div_(s.to(previous.bias.dtype))
        previous.weight.div_(s.to(previous.weight.dtype))


def awq_fold_(model, calibration: torch.Tensor, bits: int, group_size: int, search_tokens: int = 4096,
              batch_size: int = 8) -> dict:
    """Fold AWQ scales into every block of `model` in place; returns the chosen alphas and errors per group."""
    started = time.perf_counter()
    layers = decoder_layers(model)
    log = []
    with torch.no_grad():
        inputs = calibrate.first_block_inputs(model, calibration, batch_size)
        per_block = block_kwargs(model, calibration[:1])
        for position, layer in enumerate(layers):
            inputs = [(hidden, per_block[position]) for hidden, _ in inputs]
            groups = _groups(layer)
            captured, _, _ = calibrate.capture_inputs(layer, inputs, {name: linears[0] for name, _, linears in groups})
            for name, previous, linears in groups:
                x = torch.cat(captured.pop(name))
                x = x[::max(1, len(x) // search_tokens)]
                weight = torch.cat([linear.weight.float() for linear in linears])
                s, alpha, error, base = search_scale(x, weight, bits, group_size)
                fold_(previous, linears, s)
                log.append({"block": position, "group": name, "alpha": alpha, "error": error, "error_alpha0": base})
            inputs = calibrate.run_block(layer, inputs)
    return {"seconds": time.perf_counter() - started, "groups": log}
