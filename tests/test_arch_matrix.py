"""The architecture matrix: each supported family, built tiny from its transformers config with seeded random weights,
goes through inventory, every preset, RTN and GPTQ, the fast scan, evaluation, and apply -> save -> reload -> eval."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.export import save_candidate
from shrink_core.errors import ShrinkError
from shrink_core.evaluation.evaluate import evaluate
from shrink_core.evaluation.slices import get_slice
from shrink_core.formats import packed_weight_bytes
from shrink_core.model.arch import decoder_layers, uncovered_modules, uncovered_sentence
from shrink_core.model.inventory import block_linears, inventory, summary
from shrink_core.model.load import LoadedModel, ModelSpec
from shrink_core.model.toy import FAMILIES, ByteTokenizer, tiny_family
from shrink_core.plan import load_plan, resolve
from shrink_core.plan.presets import preset_names
from shrink_core.plan.resolve import FALLBACK
from shrink_core.sensitivity.scan import run_scan

LLAMA_KINDS = {"q", "k", "v", "o", "gate", "up", "down"}
EXPECTED_KINDS = {  # the block linears' kinds each family must show
    "phi3": {"qkv", "o", "gate_up", "down"},
    "gpt2": {"qkv", "o", "up", "down"},
    "gpt_neox": {"qkv", "o", "up", "down"},
    "opt": {"q", "k", "v", "o", "up", "down"},
}
MOE = {"mixtral": 4, "qwen2_moe": 4, "qwen3_moe": 4}  # experts per layer
STRUCTURED = {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text"}  # head / channel pruning apply
CALIBRATION = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    return request.param


def _rows(model):
    return {r.name: r for r in inventory(model)}


def test_inventory_names_every_weight_with_the_right_kind(family):
    model = tiny_family(family)
    rows = inventory(model)
    linears = block_linears(rows)
    assert {r.kind for r in linears} == EXPECTED_KINDS.get(family, LLAMA_KINDS)
    assert {r.block for r in linears} == {0, 1, 2}
    assert {r.kind for r in rows if r.block is None} >= {"embedding", "lm_head"}
    assert uncovered_modules(model, {r.name for r in rows}) == {}  # nothing silently skipped
    # every weight matrix of every block is an inventoried (out, in) Linear
    named = dict(model.named_modules())
    for row in linears:
        assert isinstance(named[row.name], torch.nn.Linear) and row.shape == tuple(named[row.name].weight.shape)
    if family in MOE:
        experts = {(r.block, r.expert) for r in linears if r.expert is not None}
        assert experts == {(b, e) for b in (0, 1, 2) for e in range(MOE[family])}
        assert summary(model, rows)["experts"] == MOE[family]
        assert not any(r.name.endswith(".gate") for r in rows)  # the router is kept, not inventoried
    else:
        assert all(r.expert is None for r in rows)


def test_gpt2_conv1d_is_quantized_along_its_input_axis_with_exact_bytes():
    model = tiny_family("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, torch.nn.Linear) and tuple(c_attn.weight.shape) == (192, 64)  # (out, in): transposed
    report = apply_plan_(model, load_plan("preset:w8"))
    row = next(m for m in report.modules if m.name == "transformer.h.0.attn.c_attn")
    assert row.packed_bytes == packed_weight_bytes((192, 64), 8, None, True)["total"] + 192 * 4  # + fp32 bias
    plan = load_plan({"version": 1, "name": "g", "rules": [{"kind": ["qkv"], "weights": {
        "bits": 2, "group_size": 32, "symmetric": False, "method": "rtn"}}]})
    apply_plan_(model, plan)
    groups = c_attn.weight.detach().reshape(192, 2, 32)  # 32 consecutive inputs of one output: one scale
    assert max(len(torch.unique(g)) for g in groups.reshape(-1, 32)) <= 4


def test_each_expert_gets_statistics_from_the_tokens_routed_to_it_alone():
    from shrink_core.compression import calibrate

    model = tiny_family("mixtral")
    layer = decoder_layers(model)[0]
    names = [f"model.layers.0.mlp.experts.{e}.gate_proj" for e in range(4)]
    assert len({calibrate.input_source(n, "gate") for n in names}) == 4  # one input source per expert
    hooks = calibrate.HessianHooks({f"e{e}": layer.mlp.experts[e].gate_proj for e in range(4)})
    with torch.no_grad():
        calibrate.run_block(layer, calibrate.first_block_inputs(model, CALIBRATION))
    hooks.remove()
    # top-2 routing: the experts' token counts add up to twice the tokens, and no expert sees them all
    assert sum(hooks.tokens.values()) == 2 * CALIBRATION.numel()
    assert all(0 < n < CALIBRATION.numel() for n in hooks.tokens.values())
    assert all(h.shape == (64, 64) and h.trace() > 0 for h in hooks.hessians.values())


def test_every_preset_resolves_and_rtn_and_gptq_apply(family):
    model = tiny_family(family)
    for name in preset_names():
        resolved = resolve(model, load_plan(f"preset:{name}"))
        assert any(r.weights or r.prune for r in resolved), name
    for name in ("w8", "w4g64"):  # rtn, gptq
        candidate = copy.deepcopy(model)
        report = apply_plan_(candidate, load_plan(f"preset:{name}"), CALIBRATION)
        bits = {m.name: m.bits for m in report.modules}
        assert all(bits[r.name] == int(name[1]) for r in block_linears(inventory(model))), name
        if name == "w4g64":  # GPTQ ran with statistics wherever calibration tokens reached the module
            fell_back = [m.name for m in report.modules if FALLBACK in m.action]
            assert all(".experts." in n for n in fell_back), fell_back  # only an expert no token was routed to
        with torch.no_grad():
            assert torch.isfinite(candidate(CALIBRATION[:1]).logits).all()
    structured = copy.deepcopy(model)
    if family in STRUCTURED:
        apply_plan_(structured, load_plan("preset:mlp50"), CALIBRATION)
        assert decoder_layers(structured)[0].mlp.gate_proj.out_features == 64
    else:
        with pytest.raises(ShrinkError, match="pruning needs Llama-style blocks"):
            apply_plan_(structured, load_plan("preset:mlp50"), CALIBRATION)


def test_fast_scan_and_eval_run(family, shrink_home):
    model = tiny_family(family)
    loaded = LoadedModel(ModelSpec(f"toy:{family}", "local", "toy"), model, ByteTokenizer(), Path("."),
                         f"hash-{family}", 0.0, False)
    report = run_scan(loaded, ["toy_en"], ["w4g64"], "fast", "quick", metrics=("kl",))
    scored = {r.module for r in report.records}
    assert {r.name for r in block_linears(inventory(model))} <= scored
    assert all(r.value == r.value and r.value >= 0 for r in report.records)  # finite, never negative
    embedding = [r for r in report.records if r.kind == "embedding"]
    assert embedding and embedding[0].method == "exhaustive" and embedding[0].value > 0
    (result,) = evaluate(model, ByteTokenizer(), [get_slice("toy_en")], "fast")
    assert 1 < result.ppl < 1e4


def test_the_probe_cache_reproduces_the_models_own_forward(family):
    """Block by block with each block's own mask and rotary tables (Gemma's window is 16 < 40 tokens here), then
    the family's final norm and head: the same log-probs as one plain forward."""
    from shrink_core.sensitivity.probe import ProbeCache

    model = tiny_family(family)
    ids = CALIBRATION[:, :40]
    cache = ProbeCache(model, ids, chunk=3)
    with torch.no_grad():
        expected = torch.log_softmax(model(ids).logits[:, :-1].float(), dim=-1)  # soft cap included, as in log_probs
    torch.testing.assert_close(cache.ref_logp, expected, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the embedding path: from the ids through every block
        torch.testing.assert_close(cache.run_from(-1, 0, 2), cache.block_inputs[-1][:2], atol=1e-5, rtol=1e-5)


def test_apply_save_reload_eval_gives_the_same_figures(family, tmp_path, shrink_home):
    from shrink_core.model.load import load

    from .test_export import tiny_tokenizer

    model = tiny_family(family)
    plan = load_plan("preset:w4g64")
    report = apply_plan_(model, plan, CALIBRATION)
    out = save_candidate(model, tiny_tokenizer(), plan, tmp_path / "cand", {"model_spec": family}, report)
    loaded = load(str(out))
    assert type(loaded.model) is type(model)
    assert _rows(loaded.model).keys() == _rows(model).keys()  # the same canonical layout after reload
    with torch.no_grad():
        assert torch.equal(loaded.model(CALIBRATION).logits, model(CALIBRATION).logits)
    before, after = (evaluate(m, ByteTokenizer(), [get_slice("toy_en")], "fast")[0] for m in (model, loaded.model))
    assert before.to_dict() == after.to_dict()


def test_an_unknown_module_type_is_named_in_one_sentence():
    class Adapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(64))

    model = tiny_family("llama")
    model.model.layers[0].adapter = Adapter()
    rows = inventory(model)
    sentence = summary(model, rows)["uncovered"]
    assert sentence == uncovered_sentence({"Adapter": ["model.layers.0.adapter"]})
    assert "Adapter (1, e.g. model.layers.0.adapter)" in sentence and sentence.endswith("kept.") and "\n" not in sentence


def test_a_student_drops_blocks_in_every_family(family):
    from shrink_core.distill.student import build_student

    student, _ = build_student(tiny_family(family), (1,))
    assert len(decoder_layers(student)) == 2 and student.config.num_hidden_layers == 2
    with torch.no_grad():
        assert torch.isfinite(student(CALIBRATION[:1], use_cache=True).logits).all()  # the KV cache renumbered
