"""Calibration plumbing: run token batches up to the first block, then block by block, collecting X^T X per input.

Inputs (`hidden`) are kept per batch, with the keyword arguments the decoder layer needs (position embeddings, mask).
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar

import torch

from shrink_core.model.arch import decoder_layers, first_block_input, model_device, run_layer

# Which modules share an input: q/k/v (or a fused qkv) read the same tensor, and so do gate/up.
INPUT_SOURCE = {"q": "attn", "k": "attn", "v": "attn", "qkv": "attn", "o": "o", "gate": "mlp", "up": "mlp",
                "gate_up": "mlp", "down": "down"}


_FORWARD_DTYPE: ContextVar[torch.dtype | None] = ContextVar("calibration_forward_dtype", default=None)
_BATCH: ContextVar[int | None] = ContextVar("calibration_batch", default=None)  # which input batch a pass runs


def fast_forward_dtype(model) -> torch.dtype | None:
    """bfloat16 for the calibration forwards of a float32 model on a CPU with native bfloat16 dot products
    (AVX512-BF16: Intel Cooper Lake and later, where AMX adds matrix tiles; AMD Zen 4 and later). Measured on the
    2-core machines this project runs on, a 4096 x 576 x 1536 linear: 6.4 ms against 64 ms in float32 on a Sapphire
    Rapids (AMX), 7.3 ms against 36 ms on an AMD EPYC (Zen 4, no AMX). The block inputs are rounded to bfloat16, a
    relative 2^-9 that is far below calibration-sample noise. Statistics stay float32 products: X^T X rounded to
    bfloat16 once per batch (4x faster) moved the damped inverse by ||(H + lam I)^-1 E|| = 2.2 on block 0's q/k/v
    input, whose largest diagonal entry is 171x the mean, and gptq-seq (128 x 512 tokens, 16 windows) measured English
    KL 0.199 against 0.069 with float32 products. None elsewhere (a float32 forward is as fast or faster there)."""
    parameter = next(model.parameters())
    if parameter.device.type != "cpu" or parameter.dtype != torch.float32:
        return None
    return torch.bfloat16 if cpu_has_bf16() else None


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bfloat16 dot products (AVX512-BF16), so float32 models calibrate and tune in
    bfloat16 here."""
    return torch.cpu._is_avx512_bf16_supported()


@contextmanager
def forward_dtype(dtype: torch.dtype | None):
    """Calibration forwards in this module run under autocast to `dtype` (None: as the model is)."""
    token = _FORWARD_DTYPE.set(dtype)
    try:
        yield
    finally:
        _FORWARD_DTYPE.reset(token)


def _autocast():
    dtype = _FORWARD_DTYPE.get()
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def _exact():
    """Statistics taken inside a forward stay float32 whatever the forwards run in."""
    return torch.autocast("cpu", enabled=False)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """A module's input as float32 (tokens, features)."""
    return x.reshape(-1, x.shape[-1]).float()


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
    with _autocast():
        captured = [first_block_input(model, batch) for batch in token_batches(tokens, batch_size)]
    return [(hidden.float() if hidden.dtype != torch.float32 and _FORWARD_DTYPE.get() else hidden, kwargs)
            for hidden, kwargs in captured]


@contextmanager
def _batch(index: int):
    token = _BATCH.set(index)
    try:
        yield
    finally:
        _BATCH.reset(token)


def run_block(layer, inputs: list[tuple[torch.Tensor, dict]]) -> list[tuple[torch.Tensor, dict]]:
    outputs = []
    with _autocast():
        for index, (hidden, kwargs) in enumerate(inputs):
            with _batch(index):
                outputs.append(run_layer(layer, hidden, kwargs))
    return [(out.to(hidden.dtype), kwargs) for out, (hidden, kwargs) in zip(outputs, inputs)]


def _accumulate_(total: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    """total + update, in place after the first: `total = total + update` holds three (in, in) float32 matrices at
    once (822 MB each for an 8B down_proj's input), this two. The same sums, bit for bit."""
    return update if total is None else total.add_(update)


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
            x = _flat(args[0])  # (tokens, in)
            with _exact():
                update = x.pow(2).sum(dim=0) if diagonal else x.T @ x  # (in,) or (in, in)
            self.hessians[source] = _accumulate_(self.hessians.get(source), update)
            self.tokens[source] = self.tokens.get(source, 0) + x.shape[0]
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def shrink_towards_diagonal_(matrix: torch.Tensor | None, amount: float) -> torch.Tensor | None:
    """(1 - amount) M + amount diag(M), in place: the off-diagonal part scaled down, the diagonal kept (so the clip
    search, Wanda and the imatrix, which read only the diagonal, are unchanged). A 1-D (diagonal) statistic, or
    amount 0, is left as it is. The calibration recipe's `shrink` (evaluation/calibration.py says why)."""
    if matrix is None or not amount or matrix.dim() != 2:
        return matrix
    diagonal = matrix.diagonal().clone()
    matrix.mul_(1 - amount)
    matrix.diagonal().copy_(diagonal)
    return matrix


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
                x = _flat(args[0])  # (tokens, in)
                sums[key] = sums.get(key, 0) + x.pow(2).sum(dim=0)

            handles.append(linear.register_forward_hook(hook))
    try:
        for batch in token_batches(tokens, batch_size):
            model(input_ids=batch.to(model_device(model)), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return sums


class _Captured(Exception):
    """Raised by a pre-hook once the module's input is taken: the rest of the block need not run."""


def module_input(layer, modules: torch.nn.Module | list[torch.nn.Module], hidden: torch.Tensor,
                 kwargs: dict) -> torch.Tensor:
    """The input that `modules` (one, or several reading one input) read, as the first of them called reads it, when
    `layer` runs on `hidden`; the block stops right there (before gate, not after it, where up was asked for)."""
    captured = []

    def grab(mod, args):
        captured.append(args[0])
        raise _Captured

    modules = modules if isinstance(modules, list) else [modules]
    handles = [module.register_forward_pre_hook(grab) for module in modules]
    try:
        with _autocast():
            run_layer(layer, hidden, kwargs)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if not captured:
        raise RuntimeError(f"{type(modules[0]).__name__} was not called by its block")
    return captured[0]


def capture_inputs(layer, inputs, modules: dict[str, torch.nn.Module]):
    """Run a block over its inputs, keeping what each source's module reads, per batch. Returns ({source: [(tokens,
    in)]}, outputs, order): one pass gives the full-precision side of every stage of a sequential method, and the
    order the block reads the sources in; order is None unless each is read exactly once per batch (a routed expert
    may be skipped or read per token group: no stage-by-stage order there)."""
    captured: dict[str, list[torch.Tensor]] = {source: [] for source in modules}
    calls: list[str] = []

    def grab(mod, args, source):
        calls.append(source)
        captured[source].append(_flat(args[0]))

    handles = [module.register_forward_pre_hook(lambda mod, args, source=source: grab(mod, args, source))
               for source, module in modules.items()]
    try:
        outputs = run_block(layer, inputs)
    finally:
        for handle in handles:
            handle.remove()
    once = len(calls) == len(inputs) * len(modules) and all(len(x) == len(inputs) for x in captured.values())
    return captured, outputs, calls[:len(modules)] if once else None


def stage_statistics(layer, inputs, module, fp_inputs: list[torch.Tensor] | None, diagonal: bool = False,
                     keep: dict[int, torch.Tensor] | None = None):
    """(H = X^T X, C = X^T X_fp) for one input source: X read by `module` (or a list of the modules that read it) in
    the block as compressed so far (on the compressed model's inputs), X_fp (per batch, from `capture_inputs` on the
    full-precision block and inputs).
    C is None without X_fp, where the two do not line up token by token, or for a `diagonal` statistic.
    `keep`: filled with X per batch as the module reads it (shape and dtype), for `SettledChildren.tail`."""
    hessian, crossing = None, not diagonal and fp_inputs is not None
    cross = None
    for index, (hidden, kwargs) in enumerate(inputs):
        with _batch(index):
            read = module_input(layer, module, hidden, kwargs)
        if keep is not None:
            keep[index] = read
        x = _flat(read)
        hessian = _accumulate_(hessian, x.pow(2).sum(dim=0) if diagonal else x.T @ x)
        if crossing:
            x_fp = fp_inputs[index] if index < len(fp_inputs) else None
            crossing = x_fp is not None and x_fp.shape == x.shape
            cross = _accumulate_(cross, x.T @ x_fp) if crossing else None
    return hessian, cross


@contextmanager
def recording_children(layer):
    """The names of `layer`'s direct children in the order they are called, over every pass run inside."""
    calls: list[str] = []
    handles = [child.register_forward_pre_hook(lambda mod, args, name=name: calls.append(name))
               for name, child in layer.named_children()]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def recording_tails(layer, modules: dict[str, torch.nn.Module]):
    """Which of `layer`'s direct children return one of `modules`' output as it is (alone, or first in a tuple whose
    other items are None) in every batch of the passes run inside: such a child's output is that module applied to
    that module's input. Yields {child name: (source, tuple length or 0)}, filled as the passes run."""
    outputs: dict[str, object] = {}  # source -> its module's output, since the current child began
    verdict: dict[str, tuple[str, int] | None] = {}

    def module_done(mod, args, output, source):
        outputs[source] = output

    def child_done(mod, args, output, name):
        arity = len(output) if isinstance(output, tuple) and all(o is None for o in output[1:]) else 0
        tensor = output[0] if arity else output
        found = next(((source, arity) for source, out in outputs.items() if out is tensor), None)
        verdict[name] = found if verdict.get(name, found) == found else None
        outputs.clear()

    handles = [m.register_forward_hook(lambda mod, args, out, source=source: module_done(mod, args, out, source))
               for source, m in modules.items()]
    handles += [child.register_forward_hook(lambda mod, args, out, name=name: child_done(mod, args, out, name))
                for name, child in layer.named_children()]
    tails: dict[str, tuple[str, int]] = {}
    try:
        yield tails
    finally:
        for handle in handles:
            handle.remove()
        tails.update({name: found for name, found in verdict.items() if found is not None})


def per_batch_order(calls: list[str], batches: int) -> list[str] | None:
    """The children's call order when every batch called the same children, each once, in the same order."""
    if not calls or len(calls) % batches:
        return None
    first = calls[:len(calls) // batches]
    return first if len(set(first)) == len(first) and calls == first * batches else None


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    return type(value)(_clone(v) for v in value) if isinstance(value, tuple) else value


class SettledChildren:
    """Outputs of a block's direct children that can no longer change, kept per calibration batch so later passes
    over the block skip them.

    A sequential method runs the block once per stage (each pass stops at its stage's module) and once more for the
    block's outputs. Once attention's projections are all compressed its output is fixed, yet the MLP stages and the
    output pass recomputed it: 2 of the 5 attention passes per block. A child is settled when none of its modules is
    still to be compressed and neither is any child called before it, so its input is fixed too. Its outputs are
    recorded by the first pass that runs it settled and returned (as copies) afterwards: the tensors a rerun computes.
    Costs one copy of each settled child's outputs per batch (for attention, the size of the block's inputs)."""

    def __init__(self, layer, order: list[str]):
        self.children = dict(layer.named_children())
        self.order = order
        self.outputs: dict[str, dict[int, object]] = {}
        self.tails: dict[str, tuple[torch.nn.Module, int, dict[int, torch.Tensor]]] = {}

    def tail(self, name: str, module: torch.nn.Module, arity: int, inputs: dict[int, torch.Tensor]) -> None:
        """Child `name` returns `module`'s output as it is (`recording_tails`: arity 0, or a tuple of that length
        whose other items are None), `module` is compressed and `inputs` (per batch) are what it reads in every later
        pass: its stage took them with everything called before it already compressed. A later pass then computes the
        child as `module(input)`, each input used once: in the MLP, down(x) in place of gate, up and the activation
        (a third of the block's linear work in the output pass); in attention, o(x) in place of q, k, v, the rotary
        embedding and the attention itself, for the pass that records the settled attention."""
        if name in self.order:
            self.tails[name] = (module, arity, inputs)

    def _tail_output(self, name: str, batch: int):
        module, arity, inputs = self.tails.get(name, (None, 0, {}))
        x = inputs.pop(batch, None)
        if x is None:
            return None
        out = module(x)
        return (out,) + (None,) * (arity - 1) if arity else out

    def settle(self, pending: list[torch.nn.Module]) -> None:
        """Settle the leading children (in call order) that hold none of `pending`, the modules still to compress.
        Only children with a linear layer keep outputs: a norm costs less to rerun than to hold."""
        pending_ids = {id(m) for m in pending}
        for name in self.order:
            modules = list(self.children[name].modules())
            if any(id(m) in pending_ids for m in modules):
                return
            if name not in self.outputs and any(isinstance(m, torch.nn.Linear) for m in modules):
                self.outputs[name] = {}

    def _wrap(self, name: str, forward):
        def settled_forward(*args, **kwargs):
            cache, batch = self.outputs.get(name), _BATCH.get()
            if batch is None:
                return forward(*args, **kwargs)
            if cache is not None and batch in cache:
                return _clone(cache[batch])
            out = self._tail_output(name, batch)
            out = forward(*args, **kwargs) if out is None else out
            if cache is None:
                return out
            cache[batch] = out
            return _clone(out)
        return settled_forward

    def __enter__(self):
        self._own = {}  # a forward set on the instance before (accelerate's offload hooks do that) comes back after
        for name in self.order:
            child = self.children[name]
            self._own[name] = child.__dict__.get("forward")
            child.forward = self._wrap(name, child.forward)  # an instance attribute shadows the class's forward
        return self

    def __exit__(self, *exc):
        for name in self.order:
            child = self.children[name]
            if self._own[name] is None:
                del child.forward
            else:
                child.forward = self._own[name]
