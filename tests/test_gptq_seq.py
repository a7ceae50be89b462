"""gptq-seq: GPTQ layer by layer within a block, towards the full-precision layer's outputs (obs.output_target)."""
import torch

from shrink_core.compression import calibrate
from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.obs import output_target
from shrink_core.model.arch import decoder_layers
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import load_plan

LINEARS = "[q, k, v, o, gate, up, down]"


def plan(method: str, bits: int = 3) -> str:
    return f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: {bits}, group_size: 32, method: {method}}}}}\n"


def test_output_target_is_the_ridge_solution_towards_the_weight():
    torch.manual_seed(0)
    x = torch.randn(400, 24, dtype=torch.float64)
    # the full-precision inputs: the compressed ones plus carried-in error, part of it a linear map of them
    x_fp = x @ (torch.eye(24, dtype=torch.float64) + 0.1 * torch.randn(24, 24, dtype=torch.float64))
    x_fp = x_fp + 0.02 * torch.randn_like(x)
    weight = torch.randn(10, 24, dtype=torch.float64)
    hessian, cross = x.T @ x, x.T @ x_fp
    target = output_target(weight, hessian, cross, damp=0.01).double()
    lam = 0.01 * hessian.diagonal().mean()
    # the gradient of ||x_fp W^T - x V^T||^2 + lam ||V - W||^2 at V = target vanishes
    gradient = -x.T @ (x_fp @ weight.T - x @ target.T) + lam * (target - weight).T
    assert gradient.abs().max() < 1e-3 * (x.T @ x_fp @ weight.T).abs().max()
    # it fits the full-precision outputs better than the weight itself does
    assert (x_fp @ weight.T - x @ target.T).pow(2).sum() < 0.2 * (x_fp @ weight.T - x @ weight.T).pow(2).sum()
    # where the inputs are the full-precision ones, the target is the weight
    assert torch.allclose(output_target(weight, hessian, hessian).double(), weight, atol=1e-4)


def test_capture_gives_the_read_order_and_stage_statistics_line_up():
    torch.manual_seed(0)
    model = tiny_llama()
    tokens = torch.randint(0, 256, (4, 32))
    inputs = calibrate.first_block_inputs(model, tokens, batch_size=2)
    layer = decoder_layers(model)[0]
    wanted = {"mlp": layer.mlp.gate_proj, "down": layer.mlp.down_proj, "attn": layer.self_attn.q_proj,
              "o": layer.self_attn.o_proj}
    captured, outputs, order = calibrate.capture_inputs(layer, inputs, wanted)
    assert order == ["attn", "o", "mlp", "down"]
    assert [x.shape for x in captured["down"]] == [(64, 128), (64, 128)]  # per batch: 2 x 32 tokens, intermediate
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(outputs, calibrate.run_block(layer, inputs)))
    # a module the block never reads (as a routed expert may be skipped): no stage-by-stage order
    assert calibrate.capture_inputs(layer, inputs, {**wanted, "unread": torch.nn.Linear(4, 4)})[2] is None
    hessian, cross = calibrate.stage_statistics(layer, inputs, layer.mlp.down_proj, captured["down"])
    hessians, _ = calibrate.collect(layer, inputs, {"down": layer.mlp.down_proj})
    assert torch.allclose(hessian, hessians["down"], rtol=1e-5, atol=1e-4) and torch.allclose(cross, hessian)
    assert calibrate.stage_statistics(layer, inputs, layer.mlp.down_proj, captured["down"][:1])[1] is None


def test_gptq_seq_equals_gptq_where_nothing_is_compressed_upstream_and_differs_after():
    """Block 0's q/k/v read the model's own embeddings in both methods: the same Hessian, a target equal to the
    weight, so the same weights. Its o_proj reads attention over quantized q/k/v: gptq-seq fits it towards the
    full-precision output, so it differs, and the layer's error against the full-precision block output drops."""
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (16, 64))
    reference = tiny_llama()
    models = {}
    for method in ("gptq", "gptq-seq"):
        model = tiny_llama()
        report = apply_plan_(model, load_plan(plan(method)), calibration)
        assert not report.notes and all(m.action.endswith(method) for m in report.modules if m.bits)
        models[method] = model
    q = "model.layers.0.self_attn.q_proj"
    modules = {method: dict(m.named_modules()) for method, m in models.items()}
    assert torch.allclose(modules["gptq"][q].weight, modules["gptq-seq"][q].weight, atol=1e-5)
    o = "model.layers.0.self_attn.o_proj"
    assert not torch.allclose(modules["gptq"][o].weight, modules["gptq-seq"][o].weight)

    def block_error(model):
        inputs = calibrate.first_block_inputs(reference, calibration[:8], batch_size=8)
        want = calibrate.run_block(decoder_layers(reference)[0], inputs)[0][0]
        got = calibrate.run_block(decoder_layers(model)[0], inputs)[0][0]
        return float((got - want).detach().pow(2).mean())  # the model's weights require grad

    assert block_error(models["gptq-seq"]) < block_error(models["gptq"])


def test_gptq_seq_without_statistics_falls_back_and_says_so():
    model = tiny_llama(tied=False)
    text = "version: 1\nrules:\n  - {kind: [lm_head], weights: {bits: 4, group_size: 32, method: gptq-seq}}\n"
    report = apply_plan_(model, load_plan(text), torch.randint(0, 256, (2, 16)))
    head = next(m for m in report.modules if m.kind == "lm_head")
    assert head.action == "int4 g32 asym rtn (fallback: no calibration statistics for gptq-seq)"



def test_settled_attention_is_reused_and_changes_no_weight(monkeypatch):
    """Once q/k/v/o are compressed, the MLP stages and the block's output pass reuse attention's recorded outputs
    instead of recomputing them; the weights are bit for bit those of recomputing."""
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (8, 32))

    def run():
        model = tiny_llama()
        calls = []
        o_proj = decoder_layers(model)[0].self_attn.o_proj
        # the full-precision copy of the block inherits the hook: count this module's calls only
        o_proj.register_forward_hook(lambda module, args, output: calls.append(1) if module is o_proj else None)
        apply_plan_(model, load_plan(plan("gptq-seq")), calibration, batch_size=4)
        return model.state_dict(), len(calls)

    reused, reused_calls = run()
    monkeypatch.setattr(calibrate, "per_batch_order", lambda calls, batches: None)  # nothing settles
    recomputed, recomputed_calls = run()
    # one call from the one-sequence forward that gathers each block's arguments; then per batch (two) the mlp stage,
    # the down stage and the output pass each run o_proj, unless attention is settled after the mlp stage
    assert (reused_calls, recomputed_calls) == (1 + 2, 1 + 6)
    assert all(torch.equal(reused[name], recomputed[name]) for name in recomputed)


def test_a_child_returning_its_last_module_is_computed_from_that_module_kept_input(monkeypatch):
    """The MLP returns down's output: the output pass computes it as down(the input down's stage kept) without
    running gate and up again, and attention is recorded as o(its kept input). Every weight, and the block outputs
    the next block calibrates on, are bit for bit those of running the children."""
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (8, 32))

    def run():
        model = tiny_llama()
        calls = {"gate": 0, "q": 0}
        layer = decoder_layers(model)[0]
        for kind, module in (("gate", layer.mlp.gate_proj), ("q", layer.self_attn.q_proj)):
            module.register_forward_hook(lambda mod, args, out, kind=kind, module=module:
                                         calls.__setitem__(kind, calls[kind] + 1) if mod is module else None)
        apply_plan_(model, load_plan(plan("gptq-seq")), calibration, batch_size=4)
        return model.state_dict(), calls

    kept, kept_calls = run()
    tails = []
    monkeypatch.setattr(calibrate.SettledChildren, "tail", lambda self, *args: tails.append(args[0]))
    rerun, rerun_calls = run()
    assert tails == ["self_attn", "mlp"] * len(decoder_layers(tiny_llama()))
    # one call from the one-sequence forward that gathers each block's arguments, then per batch (two): gate in the
    # down stage and the output pass, q in the o stage and the pass that records attention
    assert rerun_calls == {"gate": 1 + 2 * 2, "q": 1 + 2 * 2}
    assert kept_calls == {"gate": 1 + 2, "q": 1 + 2}
    assert all(torch.equal(kept[name], rerun[name]) for name in rerun)


def test_a_tail_is_a_child_whose_output_is_one_module_output_in_every_batch():
    layer = decoder_layers(tiny_llama())[0]
    modules = {"o": layer.self_attn.o_proj, "down": layer.mlp.down_proj, "attn": layer.self_attn.q_proj}
    hidden = torch.randn(2, 8, layer.self_attn.q_proj.in_features)
    with calibrate.recording_tails(layer, modules) as tails:
        for _ in range(2):
            layer.mlp(hidden)
            layer.input_layernorm(hidden)
    assert tails == {"mlp": ("down", 0)}  # a norm holds no module of `modules`: no tail
    layer.mlp.register_forward_hook(lambda mod, args, out: out * 2)  # no longer down's output as it is
    with calibrate.recording_tails(layer, modules) as tails:
        layer.mlp(hidden)
    assert tails == {}


def test_a_stage_stops_at_the_first_module_that_reads_its_input():
    layer = decoder_layers(tiny_llama())[0]
    calls = []
    layer.mlp.gate_proj.register_forward_hook(lambda *a: calls.append("gate"))
    mlp, hidden = layer.mlp, torch.randn(1, 4, layer.mlp.gate_proj.in_features)
    assert calibrate.module_input(mlp, [mlp.up_proj, mlp.gate_proj], hidden, {}) is hidden
    assert calls == []  # asked for up and gate: the pass stops before gate, which the MLP calls first
    assert calibrate.module_input(mlp, mlp.up_proj, hidden, {}) is hidden
    assert calls == ["gate"]


def test_children_order_needs_each_child_once_per_batch_in_one_order():
    assert calibrate.per_batch_order(["norm", "attn", "mlp"] * 2, 2) == ["norm", "attn", "mlp"]
    assert calibrate.per_batch_order(["norm", "attn", "mlp", "norm", "mlp", "attn"], 2) is None
    assert calibrate.per_batch_order(["norm", "attn", "norm"], 1) is None  # a child called twice
    assert calibrate.per_batch_order([], 2) is None


def test_settling_puts_back_a_forward_set_on_the_instance():
    layer = decoder_layers(tiny_llama())[0]
    own = layer.mlp.forward  # as accelerate's offload hooks set one on the instance
    layer.mlp.forward = own
    with calibrate.SettledChildren(layer, ["self_attn", "mlp"]):
        assert layer.mlp.forward is not own and "forward" in vars(layer.self_attn)
    assert vars(layer.mlp)["forward"] is own and "forward" not in vars(layer.self_attn)
