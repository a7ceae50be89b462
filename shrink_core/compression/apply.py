"""apply_plan_: the one place that changes a model for a plan (structured pruning, masks, quantization, simulation).

Order: structured pruning (heads, MLP channels, then whole blocks) on the full-precision model; then block by block,
with calibration inputs that already went through the compressed earlier blocks, masks and weight quantization;
then embedding / lm_head (round-to-nearest); then activation / KV-cache simulation hooks. Quality runs see
quantize-dequantize weights in the model's dtype; bytes are those of the packed format.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace

import torch

from shrink_core.compression import calibrate
from shrink_core.compression.ggml.types import quantize_dequantize
from shrink_core.compression.obs import clip_search, obs_compress, output_target
from shrink_core.compression.primitives import dequantize, quantize, rtn_by_rows, scale_zero
from shrink_core.compression.prune import (
    channel_scores,
    head_scores,
    mask_for,
    prune_heads_,
    prune_mlp_channels_,
    remove_blocks_,
    supports_structured,
    sync_config_,
)
from shrink_core.compression.rotate import Rotation, rotate_statistic, rotated_weights
from shrink_core.compression.simulate import attach_simulation_
from shrink_core.compression.tune import split_rows, tune_scales_
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import CalibrationRecipe, recipe_for
from shrink_core.formats import WeightFormat
from shrink_core.model.arch import block_kwargs, decoder_layers, model_device, moved, onloaded
from shrink_core.model.load import onload_for
from shrink_core.perf.memory import release_freed_memory
from shrink_core.plan import Plan, load_plan, resolve
from shrink_core.plan.resolve import DTYPE_BYTES, FALLBACK, ResolvedModule, sparse_bytes, weight_bytes
from shrink_core.plan.spec import HESSIAN_METHODS, SEQUENTIAL_METHODS

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class QuantState:
    """What the packed format stores besides the codes (which are recomputed from the dequantized weight)."""

    bits: int
    group_size: int | None
    symmetric: bool
    scale: torch.Tensor  # (out, groups) float32 holding the stored values (float16, or the log8 grid's)
    zero: torch.Tensor  # (out, groups) integer-valued
    rotation: Rotation | None = None  # set: the codes are those of the weight times R^T (compression/rotate.py)
    scales: str = "fp16"  # how the scales are stored (formats.SCALE_FORMATS)

    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.bits, self.group_size, self.symmetric, scales=self.scales)


@dataclass(frozen=True)
class ModuleReport:
    name: str
    block: int | None
    kind: str
    rule: int | None
    action: str
    bits: int | None  # weight bits (16 = float16, None = unchanged)
    shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    packed_bytes: int
    sparse_bytes: int | None
    sparse_format: str | None
    density: float  # share of weights that are non-zero after pruning
    seconds: float
    note: str = ""

    def row(self) -> dict:
        row = asdict(self)
        row["shape"] = "x".join(map(str, self.shape))
        row["new_shape"] = "x".join(map(str, self.new_shape))
        return row


@dataclass
class ApplyReport:
    modules: list[ModuleReport]
    totals: dict  # packed_bytes (modules), other_bytes (norms etc.), total_packed_bytes, dense_bytes_before, ...
    timings: dict  # seconds per phase
    calibration: dict | None  # recipe (mix, n_sequences, seq_len, seed) when calibration was used
    quant_states: dict = field(default_factory=dict, repr=False)  # module name -> QuantState
    current_names: dict = field(default_factory=dict)  # plan-time name -> name now (blocks renumbered after removal)
    # module -> (per-input-column sum of squared inputs, tokens summed) for llama.cpp types quantized with an
    # importance matrix: what an imatrix file holds, so llama-quantize can be given the same weighting
    importance: dict = field(default_factory=dict, repr=False)
    notes: list = field(default_factory=list)
    forward_dtype: str | None = None  # what the calibration forwards ran in (bfloat16 on CPUs with AVX512-BF16; None: none ran)
    tuning: dict | None = None  # the plan's `tune`: held-out KL before and after, steps, seconds (compression/tune.py)

    def rows(self) -> list[dict]:
        return [m.row() for m in self.modules]


def _no_progress(fraction: float, message: str) -> None:
    return None


def _label(row: ResolvedModule, fallback: dict | None = None) -> str:
    """What was done to the module; a calibrated method run without its statistics names what ran instead."""
    parts, fallback = [], fallback or {}
    if row.removed:
        return "remove"
    if row.prune:
        if "prune" in fallback:
            parts.append(f"prune {replace(row.prune, criterion='magnitude').label()} "
                         f"({FALLBACK} for {fallback['prune']})")
        else:
            parts.append(f"prune {row.prune.label()}")
    if row.weights:
        if "weights" in fallback:
            parts.append(f"{replace(row.weights, method='rtn').label()} ({FALLBACK} for {fallback['weights']})")
        else:
            parts.append(row.weights.label())
    return " + ".join(parts) or "keep"


def _fallback_done(fallback: dict) -> str:
    done = [f"pruned by magnitude instead of {fallback['prune']}" if "prune" in fallback else "",
            f"quantized by rtn instead of {fallback['weights']}" if "weights" in fallback else ""]
    return " and ".join(d for d in done if d)


def _compress_(members: list, row: ResolvedModule, hessian: torch.Tensor | None,
               cross: torch.Tensor | None = None) -> tuple[list, dict]:
    """Mask and/or quantize the weights of `members` (modules sharing input and settings) in place; returns the
    QuantState (or None) per member and the fallbacks taken (see `_compress_weight`).

    Rows of a weight are independent given the Hessian, so modules reading the same input (q/k/v, gate/up) are
    stacked and compressed in one pass; the result is the same as one module at a time, with fewer small steps.
    """
    if row.weights and row.weights.ggml is not None:
        (module,) = members  # llama.cpp types read a diagonal statistic at most: never stacked
        weight, state, fallback = _compress_ggml(module.weight.data, row, hessian)
        module.weight.data = weight
        return [state], fallback
    if hessian is None and row.prune is None and row.weights and not row.weights.is_float:
        # RTN (or a calibrated method without statistics: its fallback): rows are independent, so members sharing an
        # input are rounded one at a time, a block of rows at a time, never as one float32 stack (an 8B's gate/up
        # stack is 470 MB in float32, and whole-matrix rounding holds several of those)
        spec, states = row.weights, []
        for module in members:
            module.weight.data, scale, zero = rtn_by_rows(module.weight.data, spec.bits, spec.group_size,
                                                          spec.symmetric, spec.scales)
            states.append(QuantState(spec.bits, spec.group_size, spec.symmetric, scale, zero, scales=spec.scales))
        return states, ({"weights": spec.method} if spec.method != "rtn" else {})
    weight = torch.cat([m.weight.data for m in members]) if len(members) > 1 else members[0].weight.data
    weight, state, fallback = _compress_weight(weight.float(), row, hessian, cross)  # float32 math, stored as it was
    states, start = [], 0
    for module in members:
        rows = slice(start, start + module.weight.shape[0])
        start = rows.stop
        module.weight.data = weight[rows].to(module.weight.dtype).contiguous()
        states.append(None if state is None else replace(state, scale=state.scale[rows], zero=state.zero[rows]))
    return states, fallback


def _compress_ggml(weight: torch.Tensor, row: ResolvedModule, hessian: torch.Tensor | None):
    """A llama.cpp type: the mask (if any) first, then the type's blocks, weighted by the per-column sums of squared
    inputs when the method is imatrix (llama.cpp's importance matrix is their mean: the same weighting up to a
    factor). The weight is left exactly as the file holds it, so a masked weight is not re-masked: llama.cpp stores
    it dense and its zeros come back as whatever the block can represent."""
    spec, fallback = row.weights, {}
    sq_sum = None if hessian is None else (torch.diag(hessian) if hessian.dim() == 2 else hessian)
    if spec.method == "imatrix" and sq_sum is None:
        fallback["weights"] = "imatrix"
    if row.prune is not None and row.prune.is_mask:
        prune = row.prune
        if prune.criterion == "sparsegpt" or (prune.criterion == "wanda" and sq_sum is None):
            fallback["prune"], prune = prune.criterion, replace(prune, criterion="magnitude")
        weight = weight * mask_for(weight.float(), prune, sq_sum if prune.criterion == "wanda" else None)
    importance = sq_sum if spec.method == "imatrix" else None
    weight, state = quantize_dequantize(weight, spec.ggml, importance)
    return weight, state, fallback


def _compress_weight(weight: torch.Tensor, row: ResolvedModule, hessian: torch.Tensor | None,
                     cross: torch.Tensor | None = None):
    """(new weight, QuantState or None, fallbacks) for one (possibly stacked) weight; hessian (in, in), or (in,) for
    Wanda; cross (in, in) X^T X_fp for a method fitted to the full-precision outputs (see `output_target`).
    Without the statistics a calibrated method needs (embedding and lm_head have none), pruning runs by magnitude
    and quantization by rtn, and fallbacks says so: {"prune": "wanda"} / {"weights": "gptq"}."""
    prune = row.prune if row.prune and row.prune.is_mask else None
    spec = row.weights if row.weights and not row.weights.is_float else None
    full = hessian if hessian is not None and hessian.dim() == 2 else None
    sq_sum = None if hessian is None else (torch.diag(hessian) if hessian.dim() == 2 else hessian)
    mask, state, fallback = None, None, {}
    if prune and (prune.criterion == "sparsegpt" and full is None or prune.criterion == "wanda" and sq_sum is None):
        fallback["prune"], prune = prune.criterion, replace(prune, criterion="magnitude")
    if spec is not None and spec.method in HESSIAN_METHODS and full is None:
        fallback["weights"], spec = spec.method, replace(spec, method="rtn")
    if prune and prune.criterion == "sparsegpt":
        use_obs_bits = spec is not None and spec.method in HESSIAN_METHODS
        new, scale, zero, mask = obs_compress(
            weight, full, bits=spec.bits if use_obs_bits else None, group_size=spec.group_size if spec else None,
            symmetric=spec.symmetric if spec else False, sparsity=prune.amount if prune.structure != "nm" else None,
            nm=(prune.n, prune.m) if prune.structure == "nm" else None, scales=spec.scales if spec else "fp16")
        weight = new
        if use_obs_bits:
            state, spec = QuantState(spec.bits, spec.group_size, spec.symmetric, scale, zero, scales=spec.scales), None
    elif prune:
        mask = mask_for(weight, prune, sq_sum if prune.criterion == "wanda" else None)
        weight = weight * mask
    if spec is not None and spec.method in HESSIAN_METHODS:
        if cross is not None and spec.method in SEQUENTIAL_METHODS:
            weight = output_target(weight, full, cross)
            weight = weight if mask is None else weight * mask
        scale, zero = clip_search(weight, sq_sum, spec.bits, spec.group_size, spec.symmetric, spec.scales)
        weight, scale, zero, _ = obs_compress(weight, full, bits=spec.bits, group_size=spec.group_size,
                                              symmetric=spec.symmetric, scale=scale, zero=zero, act_order=True,
                                              mask=mask)
        state = QuantState(spec.bits, spec.group_size, spec.symmetric, scale, zero, scales=spec.scales)
    elif spec is not None:
        scale, zero = scale_zero(weight, spec.bits, spec.group_size, spec.symmetric, scales=spec.scales)
        weight = dequantize(quantize(weight, scale, zero, spec.bits, spec.group_size), scale, zero, spec.group_size)
        weight = weight if mask is None else weight * mask
        state = QuantState(spec.bits, spec.group_size, spec.symmetric, scale, zero, scales=spec.scales)
    elif row.weights is not None and row.weights.bits == 16:
        weight = weight.half().float()
    return weight, state, fallback


def _stacks(rows: list[ResolvedModule]) -> list[list[ResolvedModule]]:
    """Group a block's rows that read the same input and quantize the same way (GPTQ, no mask) for stacking."""
    stacks: dict[tuple, list[ResolvedModule]] = {}
    for row in rows:
        stackable = _needs_hessian(row) == "full" and row.prune is None
        key = (calibrate.input_source(row.name, row.kind), row.weights) if stackable else (row.name,)
        stacks.setdefault(key, []).append(row)
    return list(stacks.values())


@contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


MAX_ODD_FACTOR = 256  # a rotation's dense factor: width / its largest power of two (9 for 576, 7 for 14336)


def _rotatable(row: ResolvedModule, module) -> bool:
    """Integer weights, no mask, a Linear (not a transposed Conv1D or fused experts), and a width whose odd factor
    keeps the dense part of the rotation small."""
    weights, width = row.weights, getattr(module, "in_features", 0)
    return (isinstance(module, torch.nn.Linear) and weights is not None and not weights.is_float
            and weights.ggml is None and row.prune is None and width > 0
            and width // (width & -width) <= MAX_ODD_FACTOR)


def _rotations(plan: Plan, block: int, rows: list[ResolvedModule], modules: dict) -> tuple[dict, list[str]]:
    """(name -> Rotation for this block's modules, names left unrotated). Modules reading one input share its
    rotation, so a source is rotated only when every module reading it can be: otherwise none of them is."""
    if plan.rotate is None:
        return {}, []
    by_source: dict[str, list[ResolvedModule]] = {}
    for row in rows:
        by_source.setdefault(calibrate.input_source(row.name, row.kind), []).append(row)
    rotations, unrotated = {}, []
    for source, members in by_source.items():
        if all(_rotatable(row, modules[row.name]) for row in members):
            for row in members:
                rotations[row.name] = Rotation(plan.rotate.seed, block, source, modules[row.name].in_features)
        else:
            unrotated += [row.name for row in members if row.weights is not None and not row.weights.is_float]
    return rotations, unrotated


def _rotation_notes(rotated: int, unrotated: list[str], plan: Plan) -> list[str]:
    notes = []
    if rotated:
        notes.append(f"{rotated} block linears read their inputs through a {plan.rotate.kind} rotation (seed "
                     f"{plan.rotate.seed}), and their codes are taken in the rotated basis: a runtime must rotate "
                     "each such layer's input. The packed artifact stores them so; GGUF and compressed-tensors "
                     "exports refuse them.")
    if unrotated:
        more = f" and {len(unrotated) - 3} more" if len(unrotated) > 3 else ""
        notes.append(f"{len(unrotated)} quantized module(s) were not rotated ({', '.join(unrotated[:3])}{more}): "
                     "they, or a module reading the same input, are kept in float, pruned, in a llama.cpp type, or "
                     "not a plain Linear (a transposed Conv1D, fused experts), or the width's odd factor is over "
                     f"{MAX_ODD_FACTOR}.")
    return notes


def _needs_hessian(row: ResolvedModule) -> str | None:
    """'full', 'diag' or None: the calibration statistic this module's action needs."""
    if row.tied_to or row.removed or row.block is None:
        return None
    if row.weights and row.weights.ggml is not None:  # llama.cpp types read per-column sums of squares at most
        calibrated = row.weights.method == "imatrix" or (row.prune and row.prune.calibrated)
        return "diag" if calibrated else None
    if (row.weights and row.weights.method in HESSIAN_METHODS and not row.weights.is_float) or (
            row.prune and row.prune.criterion == "sparsegpt"):
        return "full"
    return "diag" if row.prune and row.prune.criterion == "wanda" else None


def _sequential(row: ResolvedModule) -> bool:
    return bool(row.weights and row.weights.method in SEQUENTIAL_METHODS and _needs_hessian(row) == "full")


@dataclass
class _BlockContext:
    """One block's compression: its calibration inputs (and the full-precision stream's, for sequential methods),
    and where the results go."""

    layer: torch.nn.Module
    fp_layer: torch.nn.Module | None  # the block before compression (sequential methods only)
    inputs: list | None
    fp_inputs: list | None
    modules: dict
    calibration: torch.Tensor | None
    states: dict
    seconds: dict
    fallbacks: dict
    importance: dict
    fp_outputs: list | None = None  # the full-precision block's outputs, when a sequential pass computed them
    settled: calibrate.SettledChildren | None = None  # children whose outputs a sequential pass kept
    shrink: float = 0.0  # the recipe's share of each full statistic's off-diagonal part removed
    rotations: dict = field(default_factory=dict)  # input source -> Rotation, for the sources the plan rotates

    def _rotated(self, source: str, statistic: torch.Tensor | None) -> torch.Tensor | None:
        """The statistic as the rotated source's inputs give it (before shrinking: the recipe shrinks towards the
        diagonal of the basis the codes are taken in)."""
        rotation = self.rotations.get(source)
        return statistic if rotation is None or statistic is None else rotate_statistic(statistic, rotation)

    def calibrated_(self, rows: list[ResolvedModule]) -> None:
        """Collect what each input source needs, then compress. With a sequential method in the block, sources are
        taken one at a time in the order the block reads them, each after the ones before it are compressed."""
        needs: dict[str, str] = {}
        for row in rows:
            need = _needs_hessian(row)
            if need:
                source = calibrate.input_source(row.name, row.kind)
                needs[source] = "full" if "full" in (need, needs.get(source)) else "diag"
        wanted = {calibrate.input_source(r.name, r.kind): self.modules[r.name] for r in rows
                  if calibrate.input_source(r.name, r.kind) in needs}
        stacks = _stacks(rows)
        order = None
        if self.fp_layer is not None and any(_sequential(r) for r in rows):
            # the full-precision pass gives X_fp for every stage, the block's read order, and the stream's next inputs
            fp_modules = dict(self.fp_layer.named_modules())
            relative = {id(module): name for name, module in self.layer.named_modules()}
            fp_wanted = {source: fp_modules[relative[id(m)]] for source, m in wanted.items()}
            with calibrate.recording_children(self.fp_layer) as calls, \
                    calibrate.recording_tails(self.fp_layer, fp_wanted) as tails:
                fp_captured, self.fp_outputs, order = calibrate.capture_inputs(self.fp_layer, self.fp_inputs, fp_wanted)
            children = calibrate.per_batch_order(calls, len(self.fp_inputs))
        if order is None:  # one pass over the block for every source
            fp_captured = None  # a routed expert's X_fp does not line up with its X: nothing to fit to
            diagonal = {source for source, need in needs.items() if need == "diag"}
            hessians, _ = calibrate.collect(self.layer, self.inputs, wanted, diagonal)
            hessians = {source: self._rotated(source, hessian) for source, hessian in hessians.items()}
            for hessian in hessians.values():
                calibrate.shrink_towards_diagonal_(hessian, self.shrink)
            self.compress_(stacks, hessians)
            return
        by_source: dict[str, list] = {}
        for members in stacks:
            row = members[0]
            source = calibrate.input_source(row.name, row.kind) if _needs_hessian(row) else None
            by_source.setdefault(source, []).append(members)
        self.compress_(by_source.pop(None, []), {})  # calibration-free rows first: later sources see them done
        self.settled = calibrate.SettledChildren(self.layer, children or [])
        for index, source in enumerate(order):
            self.settled.settle([self.modules[m.name] for later in order[index:] for members in by_source.get(later, [])
                                 for m in members])
            tail = next(((child, arity) for child, (of, arity) in tails.items() if of == source), None)
            kept = {} if tail else None  # this source's inputs, when its module is a child's output (o, down)
            with self.settled:
                readers = [self.modules[m.name] for members in by_source.get(source, []) for m in members]
                hessian, cross = calibrate.stage_statistics(self.layer, self.inputs, readers,
                                                            fp_captured.pop(source), diagonal=needs[source] == "diag",
                                                            keep=kept)
            hessian, cross = self._rotated(source, hessian), self._rotated(source, cross)
            calibrate.shrink_towards_diagonal_(hessian, self.shrink)
            calibrate.shrink_towards_diagonal_(cross, self.shrink)
            self.compress_(by_source.get(source, []), {source: hessian}, {source: cross})
            if tail:
                self.settled.tail(tail[0], wanted[source], tail[1], kept)

    def next_inputs(self) -> list:
        """The block's outputs on its (compressed-stream) inputs, reusing the outputs of children already settled."""
        with self.settled or nullcontext():
            return calibrate.run_block(self.layer, self.inputs)

    def compress_(self, stacks: list, hessians: dict, crosses: dict | None = None) -> None:
        with _single_thread():  # the column loops are many small ops: thread hand-offs cost more than they give
            for members in stacks:
                t1 = time.perf_counter()
                row = members[0]
                source = calibrate.input_source(row.name, row.kind)
                hessian = hessians.get(source) if _needs_hessian(row) else None
                cross = (crosses or {}).get(source) if _sequential(row) else None
                modules = [self.modules[m.name] for m in members]
                rotation = self.rotations.get(source)
                with rotated_weights(modules, rotation) if rotation else nullcontext():
                    member_states, fallback = _compress_(modules, row, hessian, cross)
                if hessian is not None and row.weights and row.weights.ggml and row.weights.method == "imatrix":
                    self.importance[row.name] = (hessian if hessian.dim() == 1 else torch.diag(hessian),
                                                 int(self.calibration.numel()))
                for member, state in zip(members, member_states):
                    if state is not None:
                        self.states[member.name] = state
                    if fallback:
                        self.fallbacks[member.name] = fallback
                    self.seconds[member.name] = (time.perf_counter() - t1) / len(members)


def _structured_(model, resolved, modules, calibration, batch_size) -> list[str]:
    """Heads and MLP channels, then whole blocks. Returns the config problems (non-uniform shapes)."""
    by_block = {}
    for row in resolved:
        if row.prune and row.prune.structure in ("heads", "channels", "blocks") and row.block is not None:
            by_block.setdefault((row.block, row.prune.structure), row.prune)
    if not by_block:
        return []
    layers = list(decoder_layers(model))
    unsupported = {s for (b, s) in by_block if s != "blocks" and not supports_structured(layers[b])}
    if unsupported:
        raise ShrinkError(f"{' and '.join(sorted(unsupported))} pruning needs Llama-style blocks (separate q/k/v/o and "
                          f"gate/up/down projections), which {type(model).__name__} does not have; prune whole blocks, "
                          "or use unstructured or N:M pruning.")
    stats = None
    if any(p.criterion == "activation" for p in by_block.values()):
        stats = calibrate.input_sq_sums(model, calibration, batch_size=batch_size)
    for (block, structure), prune in sorted(by_block.items()):
        layer = layers[block]
        calibrated = prune.criterion == "activation"
        if structure == "channels":
            prune_mlp_channels_(layer.mlp, prune.amount,
                                channel_scores(layer.mlp, stats[(block, "down")] if calibrated else None))
        elif structure == "heads":
            prune_heads_(layer.self_attn, prune.amount,
                         head_scores(layer.self_attn, stats[(block, "o")] if calibrated else None))
    removed = {block for block, structure in by_block if structure == "blocks"}
    if removed:
        remove_blocks_(model, removed)
    return sync_config_(model)


def apply_plan_(model, plan, calibration: torch.Tensor | None = None, progress: Progress | None = None,
                *, recipe: dict | None = None, batch_size: int = 8, onload: str | None = None,
                reference=None) -> ApplyReport:
    """Compress `model` in place following `plan`; `calibration` is a LongTensor (n_sequences, seq_len); recipe: the
    recipe those tokens were drawn by (recorded in the report; its `shrink` applies), else the plan's own.
    onload: a device ("cuda") that each block visits in turn for its calibration and compression while the model
    stays in host memory, so that device holds one block and its activations, never the model.
    reference: the unquantized model that the plan's `tune` fits to (default: a copy of `model` taken first)."""
    progress = progress or _no_progress
    work = onload_for(model, onload)
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    started, cpu_started = time.perf_counter(), time.process_time()
    resolved = resolve(model, plan)
    if plan.needs_calibration and calibration is None:
        raise ShrinkError("This plan uses a calibrated method (gptq, wanda, sparsegpt or activation) or `tune`, which "
                          "needs calibration tokens; pass calibration=LongTensor(n_sequences, seq_len) or use "
                          "rtn/magnitude without tune.")
    if plan.tune is not None:
        if work is not None:
            raise ShrinkError("The plan's tune trains through the whole model at once, which onloading one block at "
                              "a time cannot do; drop --onload, or drop tune from the plan.")
        split_rows(len(calibration), plan.tune.holdout)  # refuses a holdout that leaves nothing to train on, up front
        reference = copy.deepcopy(model) if reference is None else reference
    modules = dict(model.named_modules())
    original_index = {id(layer): index for index, layer in enumerate(decoder_layers(model))}
    original_names = {id(module): name for name, module in modules.items()}
    other_bytes_before = _other_bytes(model, resolved, modules)
    used_recipe = CalibrationRecipe.from_dict(recipe) if recipe else recipe_for(plan)
    timings, notes, states, seconds, fallbacks, importance = {}, [], {}, {}, {}, {}
    fast = calibrate.fast_forward_dtype(model) if calibration is not None and work is None else None
    with torch.no_grad(), calibrate.forward_dtype(fast):
        progress(0.02, "structured pruning")
        t0 = time.perf_counter()
        notes += _structured_(model, resolved, modules, calibration, batch_size)
        timings["structured_s"] = time.perf_counter() - t0
        other_bytes = _other_bytes(model, resolved, modules)  # norms of removed blocks are gone
        t0 = time.perf_counter()
        block_rows: dict[int, list[ResolvedModule]] = {}
        for row in resolved:
            if row.block is not None and not row.removed and not row.tied_to:
                block_rows.setdefault(row.block, []).append(row)
        calibrated_blocks = {row.block for row in resolved if _needs_hessian(row)}
        last_calibrated = max(calibrated_blocks, default=-1)
        kept_layers = list(decoder_layers(model))
        inputs = fp_inputs = None
        rotated, unrotated = 0, []
        if calibrated_blocks:
            progress(0.05, "capturing calibration inputs")
            inputs = moved(calibrate.first_block_inputs(model, calibration, batch_size), work)
            # masks and rotary tables can differ per block; the forward stops after the last calibrated block
            upto = max(p for p, layer in enumerate(kept_layers) if original_index[id(layer)] in calibrated_blocks)
            per_block = moved(block_kwargs(model, calibration[:1], upto=upto, run_blocks=work is None), work)
            if any(_sequential(row) for row in resolved):
                fp_inputs = list(inputs)  # the full-precision stream: the same tensors until the first block changes
        for position, layer in enumerate(kept_layers):
            block = original_index[id(layer)]
            rows = block_rows.get(block, [])
            if inputs is not None and position < len(per_block):
                inputs = [(hidden, per_block[position]) for hidden, _ in inputs]
                if fp_inputs is not None:
                    fp_inputs = [(hidden, per_block[position]) for hidden, _ in fp_inputs]
            rotations, skipped = _rotations(plan, block, rows, modules)
            unrotated += skipped
            with onloaded(layer, work):
                fp_layer = copy.deepcopy(layer) if fp_inputs is not None and block <= last_calibrated else None
                context = _BlockContext(layer, fp_layer, inputs, fp_inputs, modules, calibration, states, seconds,
                                        fallbacks, importance, shrink=used_recipe.shrink,
                                        rotations={r.source: r for r in rotations.values()})
                if block in calibrated_blocks:
                    context.calibrated_(rows)
                else:
                    context.compress_(_stacks(rows), {})
                if inputs is not None and block < last_calibrated:
                    inputs = context.next_inputs()
                    if fp_inputs is not None:
                        fp_inputs = context.fp_outputs or calibrate.run_block(fp_layer, fp_inputs)
                del fp_layer, context
            for name, rotation in rotations.items():
                states[name] = replace(states[name], rotation=rotation)
                rotated += 1
            if work is not None:
                _bring_home_(states, importance, [row.name for row in rows])
            if block in calibrated_blocks:
                release_freed_memory()  # a block's Hessians and their inverses are gone: give the pages back
            progress(0.05 + 0.85 * (position + 1) / len(kept_layers), f"block {block} done")
        for row in resolved:
            if row.block is None and not row.tied_to and (row.weights or row.prune):
                t1 = time.perf_counter()
                with onloaded(modules[row.name], work):
                    (state,), fallback = _compress_([modules[row.name]], row, None)
                if state is not None:
                    states[row.name] = state
                    if work is not None:
                        _bring_home_(states, importance, [row.name])
                if fallback:
                    fallbacks[row.name] = fallback
                seconds[row.name] = time.perf_counter() - t1
        timings["compress_s"] = time.perf_counter() - t0
        notes += _rotation_notes(rotated, unrotated, plan)
        tuning = None
        if plan.tune is not None:
            t0 = time.perf_counter()
            tuning = _tune_(model, reference, resolved, modules, states, calibration, plan.tune, fast, progress)
            notes.append(_tuning_note(tuning))
            timings["tune_s"] = time.perf_counter() - t0
        if work is not None:
            notes.append(f"Each block was calibrated and compressed on {work} in turn (sequential onloading); the "
                         f"model stayed on {model_device(model)}.")
        attached = attach_simulation_(model, resolved)
        if attached:
            notes.append(f"{attached} simulation hooks (activation / KV-cache quantization) are attached; they are "
                         "simulated in float and are not saved with the weights.")
    timings["total_s"] = time.perf_counter() - started
    timings["total_cpu_s"] = time.process_time() - cpu_started  # all threads; robust to other load on the machine
    progress(1.0, "applied")
    if fallbacks:
        named = [f"{name}: {_fallback_done(fallback)}" for name, fallback in fallbacks.items()]
        more = f" and {len(named) - 3} more" if len(named) > 3 else ""
        notes.append(f"{len(named)} module(s) had no calibration statistics and fell back to a calibration-free "
                     f"method ({'; '.join(named[:3])}{more}); their rows say so.")
    reports = [_module_report(row, modules, seconds.get(row.name, 0.0), fallbacks.get(row.name))
               for row in resolved]
    packed = sum(r.packed_bytes for r in reports)
    sparse = sum(r.sparse_bytes if r.sparse_bytes is not None else r.packed_bytes for r in reports)
    totals = {
        "dense_bytes_before": sum(row.dense_bytes for row in resolved) + other_bytes_before,
        "packed_bytes": packed, "other_bytes": other_bytes, "total_packed_bytes": packed + other_bytes,
        "total_packed_sparse_bytes": sparse + other_bytes,
    }
    recipe_out = None
    if calibration is not None:
        recipe_out = dict(recipe or {})
        recipe_out.setdefault("n_sequences", int(calibration.shape[0]))
        recipe_out.setdefault("seq_len", int(calibration.shape[1]))
        if used_recipe.version >= 2:  # a version 1 recipe is recorded as it always was (raw statistics)
            recipe_out.setdefault("shrink", used_recipe.shrink)
    renamed = {original_names[id(m)]: name for name, m in model.named_modules() if id(m) in original_names}
    forwards = None if calibration is None else str(fast or next(model.parameters()).dtype).replace("torch.", "")
    return ApplyReport(reports, totals, timings, recipe_out, quant_states=states, current_names=renamed, notes=notes,
                       importance=importance, forward_dtype=forwards, tuning=tuning)


def _tune_(model, reference, resolved, modules, states, calibration, spec, autocast, progress) -> dict:
    """The plan's `tune`: the integer-quantized block linears' scales trained end to end; their states updated."""
    targets = {row.name: (modules[row.name], states[row.name]) for row in resolved
               if row.block is not None and not row.removed and not row.tied_to
               and isinstance(states.get(row.name), QuantState) and type(modules[row.name]) is torch.nn.Linear}
    if not targets:
        return {"modules": 0, "steps": spec.steps}
    with torch.enable_grad():
        done = tune_scales_(model, reference, targets, calibration, spec, autocast=autocast,
                            progress=lambda f, m: progress(0.9 + 0.08 * f, m))
    states.update(done.pop("states"))
    return {"modules": len(targets), "steps": spec.steps, "batch": spec.batch, "holdout": spec.holdout, **done}


def _tuning_note(tuning: dict) -> str:
    if not tuning["modules"]:
        return ("tune: no block linear quantized to the engine's integer formats is a plain Linear (GPT-2's Conv1D, "
                "fused experts and llama.cpp types are not tuned), so there were no scales to tune.")
    held = f"{tuning['held_kl_start']:.4f} -> {tuning['held_kl_end']:.4f}"
    rates = [f"{lr:g}" + (f" for {n}" if len(tuning["lr"]) > 1 else "") for lr, n in tuning["lr"]]
    what = (f"The group scales of {tuning['modules']} block linears were tuned end to end ({tuning['steps']} steps of "
            f"{tuning['batch']} calibration sequences at lr {', '.join(rates)} against the unquantized model's "
            "next-token distribution, "
            f"{tuning['seconds']:.0f} s): KL on {tuning['holdout']} held-out calibration sequences {held}")
    return what + (", kept." if tuning["kept"] else ", not lower, so the scales were left as quantized.")


def _bring_home_(states: dict, importance: dict, names: list[str]) -> None:
    """The quantization states and importance sums a block left on the onload device, moved to the CPU: otherwise
    they would pile up there, block after block."""
    for name in names:
        state = states.get(name)
        if state is not None and is_dataclass(state):
            states[name] = replace(state, **{f.name: getattr(state, f.name).cpu() for f in fields(state)
                                             if isinstance(getattr(state, f.name), torch.Tensor)})
        if name in importance:
            importance[name] = (importance[name][0].cpu(), importance[name][1])


def _other_bytes(model, resolved, modules) -> int:
    """Bytes of parameters no plan row covers (norms; rotary tables are buffers, not parameters), at their dtype."""
    covered = set()
    for row in resolved:
        module = modules[row.name]
        covered.update(id(p) for p in module.parameters(recurse=False))
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in covered)


def _module_report(row: ResolvedModule, modules, seconds: float, fallback: dict | None = None) -> ModuleReport:
    module = modules[row.name]
    weight = module.weight
    if row.removed:
        shape, packed, density = (0, 0), 0, 0.0
    else:
        shape = tuple(weight.shape)
        dtype_bytes = DTYPE_BYTES.get(str(weight.dtype).replace("torch.", ""), 4)
        bias = getattr(module, "bias", None)
        bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
        packed = 0 if row.tied_to else weight_bytes(shape, row.weights, dtype_bytes) + bias_bytes
        density = int(torch.count_nonzero(weight)) / max(weight.numel(), 1)  # no float copy: 2 GB for an 8B head
    sparse, sparse_format = None, None
    if row.prune and row.prune.is_mask and not row.tied_to:
        sparse, sparse_format = sparse_bytes(shape, row.weights, row.prune, dtype_bytes)
        sparse += bias_bytes
    note = row.note
    if fallback and FALLBACK not in note:
        note = (note + "; " if note else "") + f"{_fallback_done(fallback)} ({FALLBACK})"
    return ModuleReport(row.name, row.block, row.kind, row.rule, _label(row, fallback), row.bits, row.shape, shape,
                        packed, sparse, sparse_format, density, seconds, note)
