"""Architecture adapter: where a causal LM keeps its blocks, final norm and head, and the one canonical layout that
every other module sees.

Canonical layout (made once, on load, by `canonicalize_`):
- every weight matrix is an nn.Linear with weight (out, in): GPT-2's Conv1D (weight (in, out)) becomes a Linear with
  the transposed weight, so quantization groups run along the input axis and byte counts are those of (out, in);
- a mixture-of-experts layer whose experts are fused 3-D parameters (transformers 5: gate_up_proj (E, 2I, H),
  down_proj (E, H, I)) becomes one module per expert (`experts.3.gate_proj`, `.up_proj`, `.down_proj`), so each expert
  is a row of the inventory, gets its own calibration statistics (only the tokens routed to it) and its own setting.
  The router is not touched.
`native_state_dict` is the inverse, for saving a checkpoint that plain transformers loads.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import nn

LAYER_LISTS = ("layers", "h", "blocks")
FINAL_NORMS = ("norm", "ln_f", "final_layer_norm")


@dataclass
class Layout:
    """What canonicalize_ changed, so that saving can undo it."""

    transposed: list[str] = field(default_factory=list)  # Linear modules that were Conv1D
    experts: list[str] = field(default_factory=list)  # expert containers that were fused 3-D parameters


# ---------------------------------------------------------------- where things are


def decoder(model):
    return model.get_decoder()


def decoder_layers(model) -> nn.ModuleList:
    inner = decoder(model)
    for attr in LAYER_LISTS:
        layers = getattr(inner, attr, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"{type(model).__name__} keeps its decoder blocks in none of {', '.join(LAYER_LISTS)}")


def set_decoder_layers(model, layers: nn.ModuleList) -> None:
    inner = decoder(model)
    for attr in LAYER_LISTS:
        if isinstance(getattr(inner, attr, None), nn.ModuleList):
            setattr(inner, attr, layers)
            return
    raise ValueError(f"{type(model).__name__} keeps its decoder blocks in none of {', '.join(LAYER_LISTS)}")


def final_hidden(model, hidden: torch.Tensor) -> torch.Tensor:
    """The last block's output through the final norm (and OPT's project_out): the head's input."""
    inner = decoder(model)
    for attr in FINAL_NORMS:
        norm = getattr(inner, attr, None)
        if isinstance(norm, nn.Module):
            hidden = norm(hidden)
            break
    project = getattr(inner, "project_out", None)
    return project(hidden) if isinstance(project, nn.Module) else hidden


class _Stop(Exception):
    pass


@contextmanager
def recomputed_blocks(model, enabled: bool = True):
    """Inside, each decoder block keeps no activations for the backward: only its input, and it runs again when the
    backward reaches it (non-reentrant checkpointing). The gradients are the same bits; the graph of a whole model
    (2.2 GB for 4 x 64 tokens of an 8B in bf16) becomes the block boundaries and one block's. Forward hooks on the
    block's modules fire again in the recompute; hooks on the tensors of the first forward are the ones the backward
    reaches."""
    from torch.utils.checkpoint import checkpoint

    layers = list(decoder_layers(model)) if enabled else []
    with _forwards_replaced(layers, lambda layer: partial(checkpoint, layer.forward, use_reentrant=False)):
        yield


@contextmanager
def _forwards_replaced(layers: list[nn.Module], make):
    """Inside, each layer's forward is `make(layer)`; afterwards what it was (a forward someone else set on the
    instance included)."""
    own = [layer.__dict__.get("forward") for layer in layers]
    for layer in layers:
        layer.forward = make(layer)
    try:
        yield
    finally:
        for layer, previous in zip(layers, own):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


def model_device(model) -> torch.device:
    """Where the model's weights are: the device its token ids must be on."""
    return next(model.parameters()).device


def first_block_input(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(hidden (batch, seq, hidden), the keyword arguments the blocks take) as the model hands them to its first
    block: embeddings, position tables, masks and rotary tables made by the family's own code."""
    captured = {}

    def grab(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _forward_until_stopped(model, ids, attention_mask)
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def block_kwargs(model, ids: torch.Tensor, upto: int | None = None, run_blocks: bool = True,
                 attention_mask: torch.Tensor | None = None) -> list[dict]:
    """The keyword arguments each block gets in a forward over `ids`: a family may give blocks different masks or
    rotary tables (Gemma's sliding-window and global layers), so they are taken per block, not from the first.
    `upto`: only blocks [0, upto] (the forward stops there). run_blocks=False passes each block's input through
    unchanged: the masks and rotary tables are made before the blocks run and do not depend on their outputs, so
    a model whose blocks wait elsewhere (onloaded one at a time) gives the same arguments without computing them."""
    captured: list[dict] = []
    layers = decoder_layers(model)
    last = len(layers) - 1 if upto is None else min(upto, len(layers) - 1)
    if not run_blocks:
        with _forwards_replaced(list(layers)[:last + 1], lambda layer: _identity):
            return block_kwargs(model, ids, upto=last, attention_mask=attention_mask)

    def grab(module, args, kwargs):
        captured.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if len(captured) > last:
            raise _Stop

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        _forward_until_stopped(model, ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _forward_until_stopped(model, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
    """A forward over `ids` (on the model's device) that a hook ends by raising _Stop."""
    mask = {} if attention_mask is None else {"attention_mask": attention_mask.to(model_device(model))}
    try:
        model(input_ids=ids.to(model_device(model)), use_cache=False, **mask)
    except _Stop:
        pass


def _identity(hidden_states, *args, **kwargs):
    return hidden_states


def moved(value, device: torch.device | None):
    """`value` with every tensor in it (inside tuples, lists and dicts too) on `device`; None leaves it as it is."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(moved(v, device) for v in value)
    if isinstance(value, dict):
        return {k: moved(v, device) for k, v in value.items()}
    return value


_ONLOAD: ContextVar[str | None] = ContextVar("onload", default=None)


@contextmanager
def onloading(device: str | None):
    """Inside, evaluation and apply send each block to `device` in turn (`--onload`); None: they run where the model
    is."""
    token = _ONLOAD.set(device)
    try:
        yield
    finally:
        _ONLOAD.reset(token)


def onload_target() -> str | None:
    return _ONLOAD.get()


@contextmanager
def outside_blocks_on(model, device: torch.device | None):
    """Inside, every weight and buffer outside the decoder blocks (embeddings, rotary tables, final norm, head) is on
    `device`, the blocks stay where they are; afterwards all is back (None: nothing moves). A tied head moves with its
    embedding: they are one parameter."""
    if device is None or model is None:
        yield
        return
    layers, home = decoder_layers(model), model_device(model)

    def move(to):
        set_decoder_layers(model, nn.ModuleList())
        try:
            model.to(to)
        finally:
            set_decoder_layers(model, layers)

    move(device)
    try:
        yield
    finally:
        move(home)


def onloaded_hidden(model, batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                    progress=None) -> list[torch.Tensor]:
    """The decoder's last hidden state (after the final norm) for each (ids, attention mask) batch, with each block
    sent to `device` once for all batches. Call inside `outside_blocks_on(model, device)`. Holds every batch's hidden
    states on the device at once: the evaluation's tokens times the hidden size (67 MB for 8148 tokens at 8B)."""
    hidden = [first_block_input(model, ids, mask)[0] for ids, mask in batches]
    kwargs = [block_kwargs(model, ids, run_blocks=False, attention_mask=mask) for ids, mask in batches]
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        with onloaded(layer, device):
            hidden = [run_layer(layer, h, k[index]) for h, k in zip(hidden, kwargs)]
        if progress:
            progress((index + 1) / len(layers))
    return [final_hidden(model, h) for h in hidden]


@contextmanager
def onloaded(module: nn.Module, device: torch.device | None):
    """Inside, `module`'s weights are on `device`; afterwards they are back where they were (None: nothing moves).
    Sequential onloading: a model larger than its GPU stays in host memory and each block visits the GPU for its
    own work, so the GPU holds one block (and its activations) at a time."""
    home = next(module.parameters()).device if device is not None else None
    if home is None or home == device:
        yield module
        return
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


def run_layer(layer, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


# ---------------------------------------------------------------- the canonical layout


class ExpertMLP(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), as the fused layer computes it for its slice of the weights."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act_fn):
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)
        self.act_fn = act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.ModuleList):
    """The experts of one MoE layer, one module each; called like transformers' fused experts."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for index, expert in enumerate(self):
            token, position = torch.where(top_k_index == index)
            if token.numel() == 0:
                continue
            for linear in (expert.gate_proj, expert.up_proj, expert.down_proj):
                linear.routed_tokens = token  # which flat (batch * seq) positions it saw: per-sequence statistics
            routed = expert(hidden_states[token]) * top_k_weights[token, position, None]
            out.index_add_(0, token, routed.to(out.dtype))
        return out


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return linear


def _is_fused_experts(module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and getattr(module, "act_fn", None) is not None)


def canonicalize_(model) -> Layout:
    """Bring `model` to the canonical layout in place (see the module docstring); returns what changed."""
    from transformers.pytorch_utils import Conv1D

    layout = getattr(model, "shrink_layout", None) or Layout()
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(module, Conv1D):
            setattr(parent, leaf, _linear(module.weight.data.T, module.bias.data if module.bias is not None else None))
            layout.transposed.append(name)
        elif _is_fused_experts(module):
            gate_up, down = module.gate_up_proj.data, module.down_proj.data
            half = gate_up.shape[1] // 2  # gate rows first, then up: the fused layer's chunk(2, dim=-1)
            setattr(parent, leaf, Experts(ExpertMLP(gate_up[e, :half], gate_up[e, half:], down[e], module.act_fn)
                                          for e in range(gate_up.shape[0])))
            layout.experts.append(name)
    model.shrink_layout = layout
    return layout


def native_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's state dict in its family's own layout (Conv1D weights (in, out), fused 3-D experts)."""
    state = model.state_dict()
    layout = getattr(model, "shrink_layout", None) or Layout()
    for name in layout.transposed:
        state[f"{name}.weight"] = state[f"{name}.weight"].T.contiguous()
    for name in layout.experts:
        count = len(model.get_submodule(name))
        gate_up, down = [], []
        for e in range(count):
            prefix = f"{name}.{e}"
            gate_up.append(torch.cat([state.pop(f"{prefix}.gate_proj.weight"), state.pop(f"{prefix}.up_proj.weight")]))
            down.append(state.pop(f"{prefix}.down_proj.weight"))
        state[f"{name}.gate_up_proj"] = torch.stack(gate_up)
        state[f"{name}.down_proj"] = torch.stack(down)
    return state


# ---------------------------------------------------------------- coverage

# Parameter-owning modules that are kept at their dtype on purpose: MoE routers (tiny, and routing decides which
# expert sees a token), learned position tables, OPT's embedding projections.
KEPT_TYPES = ("Router", "PositionalEmbedding")
KEPT_LEAVES = ("gate", "wpe", "embed_positions", "project_in", "project_out", "shared_expert_gate")


def uncovered_modules(model, covered: set[str]) -> dict[str, list[str]]:
    """Module type -> names of modules that own parameters but are neither inventoried (`covered`) nor kept on
    purpose: the inventory does not know them, so no plan can compress them."""
    out: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if name in covered or not any(True for _ in module.parameters(recurse=False)):
            continue
        if type(module).__name__.endswith(KEPT_TYPES) or name.rsplit(".", 1)[-1] in KEPT_LEAVES:
            continue
        out.setdefault(type(module).__name__, []).append(name)
    return out


def uncovered_sentence(uncovered: dict[str, list[str]]) -> str | None:
    if not uncovered:
        return None
    parts = [f"{kind} ({len(names)}, e.g. {names[0]})" for kind, names in sorted(uncovered.items())]
    return (f"The inventory does not know the module type(s) {'; '.join(parts)}: they stay at their dtype, no plan "
            "compresses them, and their bytes are counted as kept.")
