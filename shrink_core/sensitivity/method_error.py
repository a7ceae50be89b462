"""How much of RTN's error a calibrated method leaves, per module and setting, measured at the module's output.

The scan scores each module moved alone to each setting's RTN weight. A calibrated method (GPTQ) shapes its error
against the module's input correlations, and how much that buys differs by module and by setting (at 2 bits GPTQ
removes far more of RTN's output error than at 4). The layer-output ratio

    r(m, s) = tr(dW_method H dW_method^T) / tr(dW_rtn H dW_rtn^T),     H = X^T X / N of module m's inputs

is that saving: the squared output error the method leaves over the one RTN leaves, on the same calibration inputs.
Scaling the scan's RTN scores by it gives a scan for the method at no extra model passes beyond one forward for H
(the Fisher-based scan with the method's own weights needs per-sequence gradients whose rank is the number of
sequences, too few to rank thousands of module-settings against each other).
"""
from __future__ import annotations

import torch

from shrink_core.compression.calibrate import HessianHooks, input_source, token_batches
from shrink_core.model.arch import model_device


def input_hessians(model, rows, tokens: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """module name -> H = X^T X / N (in, in) of its inputs over `tokens`, one full-precision forward; modules that
    read the same input (q/k/v, gate/up) share one matrix. rows: inventory rows of the block linears."""
    readers: dict[str, list[str]] = {}
    for row in rows:
        readers.setdefault(input_source(row.name, row.kind), []).append(row.name)
    # the calibration path's own accumulator, on one reader of each input, over whole-model forwards
    hooks = HessianHooks({source: model.get_submodule(names[0]) for source, names in readers.items()})
    try:
        with torch.inference_mode():
            for batch in token_batches(tokens, batch_size):
                model(input_ids=batch.to(model_device(model)), use_cache=False)
    finally:
        hooks.remove()
    means = {source: hooks.hessians[source] / hooks.tokens[source] for source in readers}
    return {name: means[source] for source, names in readers.items() for name in names}


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr(dW H dW^T): the summed squared output error per input token of a weight error dW (out, in)."""
    delta = delta.float()
    return float(((delta @ hessian) * delta).sum())


def output_ratios(originals: dict[str, torch.Tensor], method_weights: dict[str, dict[str, torch.Tensor]],
                  rtn_weight, hessians: dict[str, torch.Tensor], options: list[str]) -> dict[tuple[str, str], float]:
    """(module, option) -> r(m, s) for every quantizing option: method_weights from `local.method_option_weights`,
    rtn_weight(name, option) RTN's weight (`local.OptionWeights`). An option RTN leaves exact (no error) gets 1."""
    ratios = {}
    for name, original in originals.items():
        if name not in method_weights:
            continue
        w, h = original.float(), hessians[name]
        for option in options:
            if option == "keep":
                continue
            rtn = output_error(rtn_weight(name, option) - w, h)
            ratios[(name, option)] = (output_error(method_weights[name][option].float() - w, h) / rtn
                                      if rtn > 0 else 1.0)
    return ratios


def slice_ratios(model, rows, originals: dict[str, torch.Tensor], method_weights: dict[str, dict[str, torch.Tensor]],
                 rtn_weight, options: list[str], ids: dict, progress=None) -> dict[tuple, float]:
    """`output_ratios` with H from each slice's own calibration tokens: ids maps slice -> (n, T) tokens, and the result
    (module, option, slice) -> r. A slice of None gives (module, option) keys: one ratio from shared tokens.
    rows: inventory rows of the modules in `originals`; progress(i, slice) before each slice."""
    by_name = {r.name: r for r in rows}
    ratios: dict[tuple, float] = {}
    for i, (slice_id, tokens) in enumerate(ids.items()):
        if progress:
            progress(i, slice_id)
        hessians = input_hessians(model, [by_name[m] for m in originals], tokens)
        found = output_ratios(originals, method_weights, rtn_weight, hessians, options)
        del hessians  # (in, in) per module: one slice's at a time
        ratios.update({key if slice_id is None else (*key, slice_id): r for key, r in found.items()})
    return ratios
