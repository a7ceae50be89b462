"""apply_plan_ on the tiny model: GPTQ vs round-to-nearest, reports, progress, calibration contract, simulation."""
import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.calibration import SHRINK_DEFAULT
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import load_plan

LINEARS = "[q, k, v, o, gate, up, down]"


def plan(method: str, bits: int = 3) -> str:
    return f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: {bits}, group_size: 32, method: {method}}}}}\n"


def layer_inputs(model, tokens):
    """Inputs of every block linear (name -> (tokens, in)) in the full-precision model."""
    captured, handles = {}, []

    def hook(module, args, output, name):
        captured[name] = args[0].reshape(-1, args[0].shape[-1])

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            handles.append(module.register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name)))
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    return captured


def test_gptq_beats_rtn_on_layer_output_error():
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (16, 64))
    reference = tiny_llama()
    inputs = layer_inputs(reference, calibration[:4])
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        apply_plan_(model, load_plan(plan(method)), calibration)
        modules = dict(model.named_modules())
        ref_modules = dict(reference.named_modules())
        errors[method] = sum(float((x @ (modules[n].weight - ref_modules[n].weight).detach().T).pow(2).mean())
                             for n, x in inputs.items())
    assert errors["gptq"] < 0.9 * errors["rtn"]  # near-isotropic random-init inputs: GPTQ gains less than on real ones


def test_partial_last_group_with_gptq_and_rtn():
    """hidden 96, group 64: q..up have a group of 64 and one of 32; GPTQ keeps every weight on its group's grid."""
    from shrink_core.compression.primitives import dequantize, quantize

    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (8, 32))
    for method in ("rtn", "gptq"):
        model = tiny_llama(hidden=96)
        text = f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: 4, group_size: 64, method: {method}}}}}\n"
        report = apply_plan_(model, load_plan(text), calibration)
        q_name = "model.layers.0.self_attn.q_proj"
        state = report.quant_states[q_name]
        assert state.scale.shape == (96, 2)  # ceil(96 / 64)
        weight = dict(model.named_modules())[q_name].weight.detach()
        on_grid = dequantize(quantize(weight, state.scale, state.zero, 4, 64), state.scale, state.zero, 64)
        assert torch.allclose(on_grid, weight, atol=1e-6)
        q = next(m for m in report.modules if m.name == q_name)
        assert q.packed_bytes == 96 * 96 // 2 + 96 * 2 * 3 and "partial last group" in q.note
        assert report.quant_states["model.layers.0.mlp.down_proj"].scale.shape == (96, 3)  # 192 = 3 x 64


def test_report_progress_and_packed_totals(tmp_path):
    from shrink_core.compression.export import write_packed_artifact
    from tests.test_byte_accounting import data_bytes

    model = tiny_llama()
    calls = []
    report = apply_plan_(model, load_plan("preset:w4g64"), torch.randint(0, 256, (4, 32)),
                         progress=lambda f, m: calls.append((f, m)))
    assert calls[-1] == (1.0, "applied") and all(0 <= f <= 1 for f, _ in calls)
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)
    q = next(m for m in report.modules if m.name == "model.layers.0.self_attn.q_proj")
    assert q.packed_bytes == 64 * 64 // 2 + 64 * 1 * 3  # 4-bit codes + per group fp16 scale and uint8 zero
    totals = report.totals
    assert totals["other_bytes"] == (3 * 2 + 1) * 64 * 4  # two RMSNorms per block and the final one, fp32
    assert totals["dense_bytes_before"] == 127_424 * 4  # every parameter of the tiny model once, fp32
    # the total is what the packed artifact holds: measured from the written file, not re-added from the rows
    write_packed_artifact(model, report, tmp_path / "p.safetensors")
    assert totals["total_packed_bytes"] == data_bytes(tmp_path / "p.safetensors")
    assert totals["total_packed_bytes"] < 0.5 * totals["dense_bytes_before"]
    assert set(report.timings) >= {"structured_s", "compress_s", "total_s"}
    from shrink_core.compression.calibrate import fast_forward_dtype

    forwards = str(fast_forward_dtype(model) or torch.float32).replace("torch.", "")  # bfloat16 where the CPU has AVX512-BF16
    assert report.calibration == {"n_sequences": 4, "seq_len": 32, "shrink": SHRINK_DEFAULT}
    assert report.forward_dtype == forwards
    assert len(report.quant_states) == 21


def test_calibrated_plan_without_tokens_is_refused():
    with pytest.raises(ShrinkError, match="needs calibration tokens"):
        apply_plan_(tiny_llama(), load_plan("preset:prune50"))


def test_rtn_needs_no_calibration_and_changes_weights_in_place():
    model = tiny_llama()
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    apply_plan_(model, load_plan(plan("rtn", bits=4)))
    after = model.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(before, after)
    assert after.reshape(128, 2, 32).unique(dim=-1).shape[-1] <= 32  # at most 16 levels per group of 32
    assert all(row.unique().numel() <= 16 for row in after.reshape(-1, 32)[:20])


def test_simulation_hooks_change_outputs_and_are_reported():
    tokens = torch.randint(0, 256, (1, 16))
    base = tiny_llama()
    with torch.no_grad():
        reference = base(tokens).logits
    model = tiny_llama()
    text = "version: 1\nrules:\n  - {kind: [k, v], kv_cache_bits: 2}\n  - {kind: [gate, up], activation_bits: 8}\n"
    report = apply_plan_(model, load_plan(text))
    with torch.no_grad():
        simulated = model(tokens).logits
    assert not torch.allclose(simulated, reference) and any("simulation hooks" in n for n in report.notes)
    assert torch.equal(model.model.layers[0].self_attn.k_proj.weight, base.model.layers[0].self_attn.k_proj.weight)
