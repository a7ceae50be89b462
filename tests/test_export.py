"""Candidates on disk: apply -> save -> load round trip, packed artifact vs accounting, deployment exports."""
import json

import pytest
import torch
import yaml

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.export import PACKED_FILE, llama_cpp_tensor_types, llm_compressor_recipe, save_candidate
from shrink_core.evaluation.calibration import SHRINK_DEFAULT
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import dump_plan, load_plan, resolve


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(255)} | {"<unk>": 255}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w0")


@pytest.mark.parametrize("preset", ["w4g64", "mlp50"])
def test_apply_save_load_round_trip_gives_identical_logits(preset, tmp_path, shrink_home):
    from shrink_core.model.load import load

    model, tokens = tiny_llama(), torch.randint(0, 256, (2, 24))
    plan = load_plan(f"preset:{preset}")
    report = apply_plan_(model, plan, torch.randint(0, 256, (4, 32)), recipe={"mix": {"en": 1.0}, "seed": 0})
    with torch.no_grad():
        expected = model(tokens).logits
    out = save_candidate(model, tiny_tokenizer(), plan, tmp_path / "cand", {"model_spec": "toy", "weights_hash": "x"},
                         report)
    loaded = load(str(out))
    with torch.no_grad():
        assert torch.equal(loaded.model(tokens).logits, expected)
    assert load_plan(str(out / "plan.yaml")) == plan
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["model_spec"] == "toy" and provenance["code_version"] and provenance["created_utc"]
    # what was used: the recipe's fields, the tokens' shape, and the statistics' shrink (the recipe's default)
    assert provenance["calibration"] == {"mix": {"en": 1.0}, "seed": 0, "n_sequences": 4, "seq_len": 32,
                                         "shrink": SHRINK_DEFAULT}
    # the packed artifact is what the accounting predicts, within 1% (the rest is the safetensors header)
    predicted, written = report.totals["total_packed_bytes"], (out / PACKED_FILE).stat().st_size
    assert provenance["bytes"]["packed_artifact_file_bytes"] == written
    assert predicted <= written < predicted * 1.01 + 16384


def test_packed_codes_decode_to_the_model_weights(tmp_path):
    from safetensors.torch import load_file

    from shrink_core.compression.export import write_packed_artifact
    from shrink_core.compression.primitives import dequantize, unpack

    model = tiny_llama()
    report = apply_plan_(model, load_plan("preset:w3g64"), torch.randint(0, 256, (4, 32)))
    write_packed_artifact(model, report, tmp_path / "p.safetensors")
    tensors = load_file(str(tmp_path / "p.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    codes = unpack(tensors[f"{key}.codes"], 3, 128)
    restored = dequantize(codes, tensors[f"{key}.scales"].float(), tensors[f"{key}.zeros"].float(), 64)
    assert torch.allclose(restored, model.model.layers[1].mlp.down_proj.weight, atol=1e-6)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied: written once


def test_partial_last_group_packs_as_accounted(tmp_path):
    """W4 g128 with 64-wide inputs (q..up: one partial group per row): the artifact holds ceil(in / 128) scales."""
    from safetensors.torch import load_file

    from shrink_core.compression.export import write_packed_artifact
    from shrink_core.compression.primitives import dequantize, unpack

    model = tiny_llama()
    report = apply_plan_(model, load_plan("preset:w4g128"), torch.randint(0, 256, (4, 32)))
    written = write_packed_artifact(model, report, tmp_path / "p.safetensors")
    predicted = report.totals["total_packed_bytes"]
    assert predicted <= written < predicted * 1.01 + 16384
    tensors = load_file(str(tmp_path / "p.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert tensors[f"{key}.scales"].shape == (64, 1)
    restored = dequantize(unpack(tensors[f"{key}.codes"], 4, 64), tensors[f"{key}.scales"].float(),
                          tensors[f"{key}.zeros"].float(), 128)
    assert torch.allclose(restored, model.model.layers[0].self_attn.q_proj.weight, atol=1e-6)


def test_unsaveable_non_uniform_structure_is_one_sentence(tmp_path):
    from shrink_core.errors import ShrinkError

    model = tiny_llama()
    plan = load_plan("version: 1\nrules:\n  - {blocks: [0], kind: [gate, up, down], "
                     "prune: {structure: channels, amount: 0.5}}\n")
    apply_plan_(model, plan)
    with pytest.raises(ShrinkError, match=r"^The pruned model cannot be saved: MLP widths differ between blocks"):
        save_candidate(model, tiny_tokenizer(), plan, tmp_path / "c", {})


def test_deployment_exports(tiny_model):
    plan = load_plan("""
version: 1
rules:
  - {blocks: [0], kind: [q, k, v, o, gate, up, down], keep: true}
  - {kind: [q, k, v, o], weights: {bits: 4, group_size: 32, method: gptq}}
  - kind: [gate, up, down]
    weights: {bits: 8, group_size: channel, symmetric: true}
    prune: {structure: nm, n: 2, m: 4, criterion: sparsegpt}
""")
    resolved = resolve(tiny_model, plan)
    recipe = yaml.safe_load(llm_compressor_recipe(resolved))
    gptq = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]
    group = gptq["config_groups"]["group_0"]
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    assert r"re:^model\.layers\.1\.self_attn\.q_proj$" in group["targets"] and len(group["targets"]) == 8
    assert "lm_head" in gptq["ignore"] and r"re:^model\.layers\.0\.self_attn\.q_proj$" in gptq["ignore"]
    rtn = recipe["quant_stage"]["quant_modifiers"]["QuantizationModifier"]["config_groups"]["group_0"]
    assert rtn["weights"]["strategy"] == "channel" and "group_size" not in rtn["weights"]
    sparse = recipe["sparsity_stage"]["sparsity_modifiers"]["SparseGPTModifier"]
    assert sparse["mask_structure"] == "2:4" and sparse["sparsity"] == 0.5 and len(sparse["targets"]) == 6
    lines = llama_cpp_tensor_types(resolved).splitlines()
    assert r"^blk\.1\.attn_q\.weight$=q4_1" in lines and r"^blk\.2\.ffn_down\.weight$=q8_0" in lines
    assert r"^blk\.0\.attn_q\.weight$=f32" in lines and r"^token_embd\.weight$=f32" in lines
    assert not any(line.startswith(r"^output") for line in lines)  # tied to token_embd: one tensor
    assert dump_plan(plan).startswith("version: 1")


@pytest.mark.integration
def test_cli_apply_writes_a_reloadable_candidate(smollm2, tmp_path, shrink_home):
    import copy

    from shrink_core.cli.entry import main
    from shrink_core.model.load import load

    out = tmp_path / "w8"
    assert main(["apply", "--model", "builtin:smollm2-135m", "--plan", "preset:w8", "--out", str(out), "--json"]) == 0
    candidate = load(str(out))
    expected = copy.deepcopy(smollm2.model)
    apply_plan_(expected, load_plan("preset:w8"))
    tokens = smollm2.tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(candidate.model(tokens).logits, expected(tokens).logits)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["weights_hash"] == smollm2.weights_hash and provenance["model_spec"] == "builtin:smollm2-135m"
    assert (out / "exports" / "llama-cpp-tensor-types.txt").read_text().count("=q8_0") == 30 * 7


def test_recipes_of_a_rotated_plan_say_they_are_not_the_evaluated_candidate(tiny_model, tmp_path):
    from shrink_core.compression.export import write_exports

    text = "version: 1\n{}rules:\n- {{kind: [q, k, v, o, gate, up, down], weights: {{bits: 4, group_size: 32}}}}\n"
    rotated, plain = load_plan(text.format("rotate: hadamard\n")), load_plan(text.format(""))
    paths = write_exports(resolve(tiny_model, rotated), tmp_path / "rot", rotated.rotate)
    for path in paths.values():
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# NOT the evaluated candidate") and "hadamard, seed 0" in first
    assert yaml.safe_load(paths["llm_compressor"].read_text(encoding="utf-8"))["quant_stage"]  # still a recipe
    for path in write_exports(resolve(tiny_model, plain), tmp_path / "plain", plain.rotate).values():
        assert "NOT the evaluated candidate" not in path.read_text(encoding="utf-8")
    tuned = load_plan(text.format("tune: scales\n"))
    for path in write_exports(resolve(tiny_model, tuned), tmp_path / "tuned", tuned.rotate, tuned.tune).values():
        assert path.read_text(encoding="utf-8").startswith("# NOT the evaluated candidate: the plan tunes the group")
