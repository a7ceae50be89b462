"""The plan's `rotate: hadamard` (compression/rotate.py): the rotation is the Kronecker matrix it claims, the model's
function survives it, the codes are taken in the rotated basis and stored so, and what cannot hold a rotation
refuses it in one sentence."""
import copy

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.ct_export import compressed_state_dict
from shrink_core.compression.export import packed_tensors
from shrink_core.compression.gguf_export import gguf_tensors
from shrink_core.compression.primitives import dequantize, unpack
from shrink_core.compression.rotate import Rotation, _factors, rotate_statistic, rotated_weights, walsh_hadamard
from shrink_core.errors import ShrinkError
from shrink_core.model.inventory import block_linears, inventory
from shrink_core.model.toy import FAMILIES, tiny_family, tiny_llama
from shrink_core.perf.lowbit import why_not
from shrink_core.plan import dump_plan, load_plan, plan_from_dict
from shrink_core.plan.presets import PRESETS
from shrink_core.plan.spec import PlanError, plan_to_dict
from shrink_core.results.candidates import format_summary, plan_lines, plan_summary

LINEARS = "[q, k, v, o, gate, up, down]"
CALIBRATION = torch.randint(0, 258, (4, 16), generator=torch.Generator().manual_seed(5))


def plan_text(method: str = "gptq-seq", bits: int = 4, rotate: str = "rotate: hadamard\n", rules: str = "") -> str:
    return (f"version: 1\n{rotate}rules:\n{rules}"
            f"- {{kind: {LINEARS}, weights: {{bits: {bits}, group_size: 32, method: {method}}}}}\n")


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


@pytest.mark.parametrize("size", [96, 64, 1536, 3072])  # 32 x 3, a power of two, 512 x 3, and 1024 x 3 (two stages)
def test_the_rotation_is_the_orthogonal_kronecker_matrix_it_claims(size):
    rotation = Rotation(seed=3, block=1, source="model.layers.1.mlp:down", size=size)
    signs, odd = _factors(3, 1, rotation.source, size)
    power = size & -size
    matrix = torch.kron((sylvester(power) * signs / power ** 0.5).contiguous(), odd.contiguous())
    assert torch.allclose(matrix @ matrix.T, torch.eye(size, dtype=torch.float64), atol=1e-10)
    assert bool((matrix != 0).all())  # every output channel mixes every input channel
    x = torch.randn(3, 5, size, dtype=torch.float64)
    assert torch.allclose(rotation.apply(x), x @ matrix.T, atol=1e-12)
    assert torch.allclose(rotation.invert(x), x @ matrix, atol=1e-12)
    other = Rotation(seed=4, block=1, source=rotation.source, size=size)
    assert not torch.allclose(other.apply(x), rotation.apply(x))  # the seed matters


def test_walsh_hadamard_is_sylvesters_matrix():
    x = torch.randn(4, 16, dtype=torch.float64)
    assert torch.allclose(walsh_hadamard(x), x @ sylvester(16), atol=1e-12)


def test_rotated_statistics_are_the_rotated_inputs_and_weights_fold_back():
    """No token is rotated in the calibration forwards: R M R^T is what the rotated inputs would give, and within
    `rotated_weights` the modules hold W R^T, which reads the rotated inputs as W read the plain ones."""
    rotation = Rotation(0, 0, "model.layers.0.self_attn:qkv", 96)
    x, y = (torch.randn(40, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(s)) for s in (0, 1))
    assert torch.allclose(rotate_statistic(x.T @ y, rotation), rotation.apply(x).T @ rotation.apply(y), atol=1e-10)
    model = tiny_llama(seed=1, hidden=96).eval()
    attention = model.model.layers[0].self_attn
    modules = [attention.q_proj, attention.k_proj, attention.v_proj]
    before = [m.weight.detach().clone() for m in modules]
    inputs = x.float()
    with torch.no_grad(), rotated_weights(modules, rotation):
        for module, weight in zip(modules, before):
            assert not torch.allclose(module.weight, weight, atol=1e-3)  # holds W R^T
            assert torch.allclose(module(rotation.apply(inputs)), inputs @ weight.T, atol=1e-4)
    assert all(torch.allclose(m.weight, w, atol=1e-6) for m, w in zip(modules, before))


@pytest.mark.parametrize("method", ["rtn", "gptq-seq"])
def test_a_rotated_plan_stores_codes_in_the_rotated_basis(method):
    model = tiny_llama(seed=2, hidden=96).eval()
    ids = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))
    plain, rotated = copy.deepcopy(model), copy.deepcopy(model)
    plain_report = apply_plan_(plain, load_plan(plan_text(method, 3, rotate="")), ids)
    report = apply_plan_(rotated, load_plan(plan_text(method, 3)), ids)
    names = [row.name for row in block_linears(inventory(model))]
    assert all(report.quant_states[n].rotation is not None for n in names)
    assert all(plain_report.quant_states[n].rotation is None for n in names)
    assert any("rotation (seed 0)" in note for note in report.notes)
    assert report.totals == plain_report.totals  # a rotation costs a seed, not bytes
    tensors, layout = packed_tensors(rotated, report)
    for name in names:
        state, key = report.quant_states[name], f"{name}.weight"
        weight = rotated.get_submodule(name).weight.detach()
        codes = unpack(tensors[f"{key}.codes"], state.bits, weight.shape[1])
        decoded = dequantize(codes, state.scale, state.zero, state.group_size)
        assert torch.allclose(state.rotation.invert(decoded), weight, atol=1e-5)  # Q R is the weight in memory
        in_own_basis = weight.reshape(weight.shape[0], -1, 32) / state.scale[..., None] + state.zero[..., None]
        assert not torch.allclose(in_own_basis, in_own_basis.round(), atol=1e-2)  # off the grid unrotated
        assert layout[key]["input_rotation"]["source"] == state.rotation.source
    # q, k and v read one input: one rotation; a block's sources differ, as do blocks
    attention = [report.quant_states[f"model.layers.0.self_attn.{p}_proj"].rotation for p in "qkv"]
    assert attention[0] == attention[1] == attention[2]
    others = {report.quant_states[n].rotation for n in names}
    assert len(others) == 4 * 3  # q/k/v, o, gate/up, down in each of three blocks


def test_a_source_shared_with_a_float_module_is_not_rotated_and_the_note_says_which():
    model = tiny_llama(seed=3, hidden=96).eval()
    keep_k = "- {kind: [k], keep: true}\n"
    report = apply_plan_(model, load_plan(plan_text("rtn", 4, rules=keep_k)))
    states = report.quant_states
    assert states["model.layers.0.self_attn.q_proj"].rotation is None  # reads k's input, and k stays float
    assert states["model.layers.0.self_attn.o_proj"].rotation is not None
    assert any("not rotated" in note and "q_proj" in note for note in report.notes)


def test_what_cannot_hold_a_rotation_refuses_it():
    model = tiny_llama(seed=4, hidden=96).eval()
    report = apply_plan_(model, load_plan(plan_text("rtn", 4)))
    with pytest.raises(ShrinkError, match="input rotated .* remove rotate from the plan"):
        compressed_state_dict(model, report)
    with pytest.raises(ShrinkError, match="input rotated .* which a GGUF file cannot hold"):
        gguf_tensors(model, report)
    name = "model.layers.0.mlp.down_proj"
    reason = why_not(report.quant_states[name].weight_format(), model.get_submodule(name), report.quant_states[name])
    assert "rotated input basis" in reason


def test_the_plan_reads_and_writes_rotate():
    plan = load_plan(plan_text())
    assert plan.rotate.kind == "hadamard" and plan.rotate.seed == 0
    assert load_plan(dump_plan(plan)) == plan
    assert "rotate: {kind: hadamard, seed: 0}" in dump_plan(plan)
    assert load_plan(plan_text(rotate="rotate: {kind: hadamard, seed: 7}\n")).rotate.seed == 7
    assert load_plan(plan_text(rotate="")).rotate is None
    with pytest.raises(PlanError, match="kind 'givens' is unknown; use hadamard"):
        load_plan(plan_text(rotate="rotate: givens\n"))
    with pytest.raises(PlanError, match="seed must be a whole number"):
        load_plan(plan_text(rotate="rotate: {kind: hadamard, seed: -1}\n"))
    with pytest.raises(PlanError, match="Unknown key 'angle' in the plan's rotate"):
        load_plan(plan_text(rotate="rotate: {angle: 3}\n"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_keeps_its_function_rotated_and_quantizes_rotated(family):
    """Each family's plain Linears are rotated (GPT-2's transposed Conv1D and fused experts are not: the note names
    them), the rotated preset's quantized model runs, and at 8 bits the rotated model computes what the model did (R
    folded back into each weight after its codes were taken in the rotated basis)."""
    from shrink_core.compression.apply import _rotations
    from shrink_core.plan import resolve

    model = tiny_family(family)
    original = copy.deepcopy(model)
    plan = load_plan("preset:w4g64-rot")
    rows = [r for r in resolve(model, plan) if r.block is not None]
    modules = dict(model.named_modules())
    rotations = {}
    for block in sorted({r.block for r in rows}):
        found, _ = _rotations(plan, block, [r for r in rows if r.block == block], modules)
        rotations.update(found)
    with torch.no_grad():
        expected = model(CALIBRATION[:1]).logits
    linears = [r.name for r in rows if isinstance(modules[r.name], torch.nn.Linear)]
    assert sorted(rotations) == sorted(linears) and (linears or family == "gpt2"), family
    report = apply_plan_(model, plan, CALIBRATION)
    assert {n for n, s in report.quant_states.items() if s.rotation is not None} == set(linears)
    with torch.no_grad():
        assert torch.isfinite(model(CALIBRATION[:1]).logits).all()
    rules = [{**rule, "weights": {**rule["weights"], "bits": 8}} for rule in PRESETS["w4g64-rot"]["rules"]]
    eight = plan_from_dict({"version": 1, "name": "w8-rot", "rotate": "hadamard", "rules": rules,
                            "calibration": plan.calibration.to_dict()})
    apply_plan_(original, eight, CALIBRATION)
    with torch.no_grad():
        logits = original(CALIBRATION[:1]).logits
    assert ((logits - expected).norm() / expected.norm()).item() < 0.02, family


def test_a_stored_rotated_plan_says_so_wherever_it_is_summarised():
    rotated, plain = plan_to_dict(load_plan(plan_text())), plan_to_dict(load_plan(plan_text(rotate="")))
    assert "inputs rotated (hadamard, seed 0)" in plan_summary(rotated)
    assert "rotated" not in plan_summary(plain)
    assert plan_lines(rotated)[-1].startswith("quantized linears' inputs rotated first")
    assert "inputs rotated" in format_summary(rotated) and "no GGUF" in format_summary(rotated)
    assert "compressed-tensors for int4/int8" in format_summary(plain)
