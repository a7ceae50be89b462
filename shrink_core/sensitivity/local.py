"""Scores around a plan: what moving one module from its planned setting to another does to KL(reference || plan),
to second order at the plan itself (not at the original model, where the scan scores one module at a time).

    KL(plan with module i at s) - KL(plan) ~= (G_i . dW + dW . F_i dW / 2) / N,     dW = Q_s(W_i) - Q_plan(W_i)

G_i is the gradient of the summed KL(reference || plan) over N calibration tokens, F_i the diagonal Fisher of the
plan's own model (labels sampled from it: the expectation of KL's Gauss-Newton Hessian there). The gradient is where
the interactions are: in the quadratic model of KL around the original weights, G_i = sum_j H_ij e_j, module i's
cross terms with every other module's error as the plan has them, which the scan's one-at-a-time sum leaves out and
the planner, choosing where that sum is lowest, falls into. The expansion holds near the plan, so a step changes a
bounded number of modules and is measured (`plan/local.local_search`).
Same passes as the fast scan (`fisher._passes`: one forward, a sampled-label backward, a second backward to the
reference's distribution), reduced against each option's weight error as they go (`fisher_scores`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from shrink_core.sensitivity.fisher import fisher_scores
from shrink_core.sensitivity.settings import SETTINGS, perturbed


@dataclass(frozen=True)
class LocalScores:
    slices: tuple[str, ...]
    modules: tuple[str, ...]
    options: tuple[str, ...]  # "keep" (the original weight) and menu settings
    deltas: np.ndarray  # (slices, modules, options): predicted KL change from the plan; 0 at the planned setting
    tokens: int  # scored tokens per slice
    seconds: float
    fixed: tuple[str, ...] = ()  # modules not scored here (an embedding: no weight gradient from the passes)


def option_weight(option: str, original: torch.Tensor) -> torch.Tensor:
    """A module's weight at `option` (RTN or mask as the scan scores it; keep = the original), float32."""
    return original.float() if option == "keep" else perturbed(SETTINGS[option], original).float()


class OptionWeights:
    """module -> option -> its weight as `option_weight` gives it, for repeated use: local scores need every option's
    weight on each pass of each slice (`fisher_scores` reduces against them as they go), and llama.cpp's types search
    their scales (0.1-0.5 s for a 1M-weight matrix, against milliseconds for RTN): re-quantizing them made a Gemma 3
    270M local step take over 20 minutes. Their blocks are kept (packed: under a byte a weight per type) and decoded
    on use, bit-identical to `option_weight`; other options are recomputed (cheap, and kept at no memory). Past
    `max_bytes` of blocks, further ones are quantized on each use instead of kept."""

    def __init__(self, originals: dict[str, torch.Tensor], max_bytes: int | None = None):
        self.originals, self.max_bytes, self.kept_bytes = originals, max_bytes, 0
        self.blocks: dict[tuple[str, str], object] = {}  # (module, option) -> ggml.types.GgmlState

    def __call__(self, name: str, option: str) -> torch.Tensor:
        setting = SETTINGS.get(option)
        if setting is None or setting.ggml is None:
            return option_weight(option, self.originals[name])
        from shrink_core.compression.ggml.types import CODECS, quantize_dequantize

        original = self.originals[name]
        key = (name, option)
        if key not in self.blocks:
            weight, state = quantize_dequantize(original.float(), setting.ggml)
            # a row width no llama.cpp type tiles is stored as float16 (no blocks): cheap, recomputed each time
            if state.data is not None and (self.max_bytes is None
                                           or self.kept_bytes + state.data.numel() <= self.max_bytes):
                self.blocks[key], self.kept_bytes = state, self.kept_bytes + state.data.numel()
            return weight.to(original.dtype).float()
        state = self.blocks[key]
        return CODECS[state.stored].dequantize(state.data, original.shape[1]).to(original.dtype).float()


def set_choice_(model, originals: dict[str, torch.Tensor], choice: dict[str, str],
                option_weights: OptionWeights | None = None) -> None:
    """Put each planned module of `model` at its option (in place; the originals stay untouched)."""
    with torch.no_grad():
        for name, option in choice.items():
            weight = model.get_submodule(name).weight
            moved = option_weights(name, option) if option_weights else option_weight(option, originals[name])
            weight.data = moved.to(weight.dtype)


def method_option_weights(model, names: list[str], options: list[str], apply_at,
                          dtype: torch.dtype = torch.bfloat16, progress=None) -> dict[str, dict[str, torch.Tensor]]:
    """module -> option -> its weight as a calibrated method gives it (GPTQ's error is not RTN's): per option, a copy
    of the model with every module in `names` at that option, applied by `apply_at(copy, option)` (the product's own
    path). A module's inputs are then those of the model at that option, not of the plan a step starts from: the
    approximation a measured step corrects. Kept in `dtype` (bf16: 2 bytes a weight an option). progress(i, n,
    option) before each option is applied."""
    import copy

    table: dict[str, dict[str, torch.Tensor]] = {n: {} for n in names}
    for i, option in enumerate(options):
        if progress is not None:
            progress(i, len(options), option)
        if option == "keep":
            for n in names:
                table[n][option] = model.get_submodule(n).weight.detach().to(dtype)
            continue
        at = copy.deepcopy(model)
        apply_at(at, option)
        for n in names:
            table[n][option] = at.get_submodule(n).weight.detach().to(dtype).clone()
        del at
    return table


def local_scores(reference, model, originals: dict[str, torch.Tensor], choice: dict[str, str], options: list[str],
                 ids_by_slice: dict[str, torch.Tensor], batch: int = 8, progress=None, seed: int = 0,
                 weights: dict[str, dict[str, torch.Tensor]] | None = None, quadratic: str = "diagonal",
                 option_weights: OptionWeights | None = None, recompute: bool = False) -> LocalScores:
    """reference: the original model (its next-token distributions are the targets); model: the same architecture
    holding the plan (`set_choice_`, or the plan applied by its method); originals: module -> its original weight;
    choice: module -> planned option for the modules being decided; ids_by_slice: slice -> (n, T) calibration ids
    (never eval text); weights: module -> option -> weight for a calibrated method (`method_option_weights`),
    RTN's otherwise (`option_weights`: pass one across calls to quantize llama.cpp's types once)."""
    started = time.perf_counter()
    names = list(choice)
    # the passes catch a linear's input and output gradient; an embedding (and a head tied to it) has neither, so
    # it stays where the plan put it (its deltas 0, listed as fixed)
    modules = {n: model.get_submodule(n) for n in names if isinstance(model.get_submodule(n), torch.nn.Linear)}
    deltas = np.zeros((len(ids_by_slice), len(names), len(options)))
    option_weights = option_weights or OptionWeights(originals)

    def errors(name):
        current = modules[name].weight.detach().float()
        for option in options:
            if option != choice[name]:
                moved = (option_weights(name, option) if weights is None
                         else weights[name][option].float())
                yield option, moved.to(current.device) - current  # a stored table may sit on the CPU

    tokens = 0
    for k, (slice_id, ids) in enumerate(ids_by_slice.items()):
        def targets(part):
            with torch.inference_mode():
                logits = reference(part, use_cache=False).logits[:, :-1].float()
            return torch.softmax(logits, -1).reshape(-1, logits.shape[-1])

        def tick(fraction, message="", _k=k, _id=slice_id):
            if progress:
                progress((_k + fraction) / len(ids_by_slice), f"{_id}: {message}")

        scores = fisher_scores(model, ids, modules, [], batch=batch, progress=tick, seed=seed, errors=errors,
                               soft_targets=targets, quadratic=quadratic, recompute=recompute)
        tokens = scores.tokens
        for j, option in enumerate(options):
            per_module = scores.values.get(option, {})
            for i, name in enumerate(names):
                if option != choice[name] and name in modules:
                    deltas[k, i, j] = per_module[name][1]  # first-order + second-order: the "dnll" slot's formula
    return LocalScores(tuple(ids_by_slice), tuple(names), tuple(options), deltas, tokens,
                       time.perf_counter() - started, tuple(n for n in names if n not in modules))
