"""Plan format: strict loading, presets, resolve (first match wins, tied weights, blocks, byte accounting)."""
import json

import pytest

from shrink_core.evaluation.slices import get_slice, load_rows
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import PlanError, Rule, dump_plan, load_plan, resolve
from shrink_core.plan.presets import preset_names

W4 = "{bits: 4, group_size: 32, method: rtn}"


def plan_text(*rules: str) -> str:
    return "version: 1\nrules:\n" + "".join(f"  - {r}\n" for r in rules)


@pytest.fixture(scope="module")
def wide_model():
    return tiny_llama(hidden=128)  # hidden 128 so group 128 divides


def test_every_preset_loads_round_trips_and_resolves(wide_model):
    assert set(preset_names()) >= {"w8", "w4g128", "w4g64", "w3g64", "w4g64-keep-ends", "nm24", "prune50", "mlp50"}
    for name in preset_names():
        plan = load_plan(f"preset:{name}")
        assert plan.name == name
        assert load_plan(dump_plan(plan)) == plan
        rows = resolve(wide_model, plan)
        assert any(not r.keep for r in rows), name


def test_every_calibrated_preset_mixes_slices_with_calibration_text():
    """A preset's mix may name any built-in slice (w3-log8-rot-tuned-hq takes udhr_world); each must hold calib rows."""
    mixes = {name: dict(plan.calibration.mix) for name in preset_names()
             if (plan := load_plan(f"preset:{name}")).calibration}
    assert "udhr_world" in mixes["w3-log8-rot-tuned-hq"]
    for name in {s for mix in mixes.values() for s in mix}:
        assert load_rows(get_slice(name), split="calib"), name


def test_unknown_preset_names_the_choices():
    with pytest.raises(PlanError, match=r"^Unknown plan preset 'w5'; choose one of: w8, w4g128"):
        load_plan("preset:w5")


@pytest.mark.parametrize("rule, message", [
    ("{kind: q, weights: {bits: 7, group_size: 32}}",
     "Rule 1 weights: bits 7 is not supported; use one of 2, 3, 4, 5, 6, 8, 16 or 32."),
    ("{kind: q, weights: {bits: 4, group_size: 48}}",
     "Rule 1 weights: group_size 48 is not supported; use 32, 64, 128 or 'channel'."),
    ("{kind: q, weights: {bitz: 4}}",
     "Unknown key 'bitz' in rule 1 weights; allowed keys: bits, group_size, symmetric, method, ggml, scales."),
    ("{kind: q, colour: red, keep: true}",
     "Unknown key 'colour' in rule 1; allowed keys: kind, name, blocks, keep, weights, prune, activation_bits, "
     "kv_cache_bits, note."),
    ("{kind: q}", "Rule 1 does nothing; give it weights, prune, activation_bits, kv_cache_bits or keep: true."),
    ("{kind: query, keep: true}", "Rule 1: kind 'query' is unknown; use one of embedding, q, k, v, qkv, o, gate, up, gate_up, "
     "down, linear, lm_head."),
    ("{kind: q, prune: {structure: nm, n: 3, m: 4}}",
     "Rule 1 prune: N:M pattern 3:4 is not supported; use n: 2, m: 4 or n: 4, m: 8."),
    ("{kind: [q, gate], prune: {structure: channels, amount: 0.5}}",
     "Rule 1: channels pruning needs kind limited to gate, up, down; set kind: [gate, up, down]."),
])
def test_strict_load_errors_are_one_exact_sentence(rule, message):
    with pytest.raises(PlanError) as caught:
        load_plan(plan_text(rule))
    assert str(caught.value) == message


def test_unknown_top_level_key_and_missing_version():
    with pytest.raises(PlanError, match=r"^Unknown key 'rulez' in the plan; allowed keys: rules, version"):
        load_plan("version: 1\nrulez: []\n")
    with pytest.raises(PlanError, match=r"^The plan has no version; add `version: 1` at the top\.$"):
        load_plan("rules: [{kind: q, keep: true}]\n")


def test_rule_matching_nothing_is_named(tiny_model):
    plan = load_plan(plan_text(f"{{kind: q, weights: {W4}}}", r"{name: 'model\.layers\.9\..*', keep: true}"))
    with pytest.raises(PlanError) as caught:
        resolve(tiny_model, plan)
    assert str(caught.value) == ("Rule 2 (name='model\\\\.layers\\\\.9\\\\..*') matches no module of this model; "
                                 "fix its kind, name or blocks, or delete it.")


def test_shadowed_rule_is_an_error(tiny_model):
    plan = load_plan(plan_text("{kind: [q, k], keep: true}", f"{{kind: q, weights: {W4}}}"))
    with pytest.raises(PlanError, match=r"^Rule 2 \(kind=q\) matches only modules that earlier rules already decide"):
        resolve(tiny_model, plan)


def test_group_that_does_not_divide_has_a_partial_last_group(tiny_model):
    plan = load_plan(plan_text("{kind: q, weights: {bits: 4, group_size: 128}}"))
    q = next(r for r in resolve(tiny_model, plan) if r.kind == "q")  # 64 inputs: one partial group of 64
    assert q.note == "partial last group: 64 inputs = 0 x 128 + 64"
    out = q.shape[0]
    assert q.packed_bytes == out * 64 * 4 // 8 + out * (2 + 1)  # codes + one float16 scale and uint8 zero per row


def test_first_match_wins_with_fullmatch_and_blocks(tiny_model):
    plan = load_plan(plan_text(
        r"{name: 'model\.layers\.1\.self_attn\.q_proj', keep: true}",
        "{blocks: [-1], kind: [q, k, v, o, gate, up, down], weights: {bits: 8, group_size: channel}}",
        f"{{kind: [q, k, v, o, gate, up, down], weights: {W4}}}",
        "{name: 'layers', keep: true, kind: lm_head}",  # a bare substring: fullmatch fails, so never selects
    ).replace("  - {name: 'layers', keep: true, kind: lm_head}\n", ""))
    rows = {r.name: r for r in resolve(tiny_model, plan)}
    assert rows["model.layers.1.self_attn.q_proj"].rule == 1 and rows["model.layers.1.self_attn.q_proj"].keep
    assert rows["model.layers.2.self_attn.q_proj"].rule == 2 and rows["model.layers.2.self_attn.q_proj"].bits == 8
    assert rows["model.layers.1.self_attn.k_proj"].rule == 3 and rows["model.layers.1.self_attn.k_proj"].bits == 4
    assert rows["model.embed_tokens"].rule is None and rows["model.embed_tokens"].keep
    assert Rule(name="layers", keep=True).selects(_info("model.layers.0.mlp.up_proj"), 3) is False  # fullmatch


def _info(name):
    from shrink_core.model.inventory import ModuleInfo

    return ModuleInfo(name, 0, "up", (128, 64), 0, 0, "float32")


def test_tied_weight_is_planned_once_and_says_so(tiny_model):
    plan = load_plan(plan_text("{kind: lm_head, weights: {bits: 8, group_size: 32}}"))
    rows = {r.name: r for r in resolve(tiny_model, plan)}
    embedding, head = rows["model.embed_tokens"], rows["lm_head"]
    assert head.tied_to == "model.embed_tokens" and head.packed_bytes == 0 and "tied to model.embed_tokens" in head.note
    assert embedding.bits == 8 and embedding.rule == 1  # the shared weight follows the rule matching the pair
    assert embedding.packed_bytes == 256 * 64 + 256 * 2 * 2 + 256 * 2  # codes + fp16 scales + uint8 zeros


def test_packed_bytes_in_resolved_rows(tiny_model):
    plan = load_plan(plan_text("{kind: down, weights: {bits: 3, group_size: 32, symmetric: true}}",
                               "{kind: up, prune: {structure: nm, n: 2, m: 4}}"))
    rows = {r.name: r for r in resolve(tiny_model, plan)}
    down = rows["model.layers.0.mlp.down_proj"]  # (64, 128)
    assert down.packed_bytes == 64 * (128 * 3 // 8) + 64 * 4 * 2
    up = rows["model.layers.0.mlp.up_proj"]  # (128, 64) fp32, 2:4
    assert up.packed_bytes == 128 * 64 * 4
    assert up.sparse_bytes == 128 * 64 // 2 * 4 + 128 * 64 // 2 * 2 // 8 and "2:4" in up.sparse_format
    assert set(down.row()) >= {"module", "block", "kind", "rule", "bits", "group", "method", "prune", "keep",
                               "packed_bytes"}


def test_structured_rule_must_cover_the_family(tiny_model):
    plan = load_plan(plan_text("{kind: gate, blocks: [0], keep: true}",
                               "{kind: [gate, up, down], prune: {structure: channels, amount: 0.5}}"))
    with pytest.raises(PlanError, match=r"^Rule 2 prunes channels in block 0 but model\.layers\.0\.mlp\.gate_proj "
                                        r"matches rule 1; MLP channels come out of gate, up and down together"):
        resolve(tiny_model, plan)


def test_load_from_yaml_and_json_files(tmp_path):
    plan = load_plan("preset:w4g64-keep-ends")
    (tmp_path / "p.yaml").write_text(dump_plan(plan))
    from shrink_core.plan import dump_plan_json

    (tmp_path / "p.json").write_text(dump_plan_json(plan))
    assert load_plan(str(tmp_path / "p.yaml")) == plan == load_plan(tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["rules"][0]["blocks"] == [0, -1]
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(str(tmp_path / "missing.yaml"))
