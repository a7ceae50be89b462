"""compressed-tensors export: packing bit for bit against compressed-tensors' own packer, round trips on the real
SmolLM2 through transformers and compressed-tensors' dequantizer, and the plans it refuses (one sentence, the module
named)."""
import copy
import json

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.ct_export import pack_int32, unpack_int32, write_compressed_tensors
from shrink_core.errors import ShrinkError
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import plan_from_dict

LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]
PROMPT = "The capital of France is"


def weights(bits, group, symmetric):
    return {"bits": bits, "group_size": group, "symmetric": symmetric, "method": "rtn"}


def plan(*rules):
    return plan_from_dict({"version": 1, "rules": list(rules)})


# Every group size and both symmetries: int4 g64 asym (blocks 0-1), int8 per-channel sym (block 2's MLP), int4 g32
# sym over a 50% magnitude mask (block 3's o: the mask stays dense, as zeros), int4 g128 asym (block 4's down: 1536
# inputs; the 576-wide ones take no group of 128).
MIXED = plan(
    {"blocks": [0, 1], "kind": LINEARS, "weights": weights(4, 64, False)},
    {"blocks": [2], "kind": ["gate", "up", "down"], "weights": weights(8, "channel", True)},
    {"blocks": [3], "kind": ["o"], "prune": {"structure": "unstructured", "amount": 0.5},
     "weights": weights(4, 32, True)},
    {"blocks": [4], "kind": ["down"], "weights": weights(4, 128, False)},
)
SYMMETRIC = plan(
    {"blocks": [0, 1], "kind": LINEARS, "weights": weights(4, 64, True)},
    {"blocks": [2], "kind": ["gate", "up", "down"], "weights": weights(8, "channel", True)},
)


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_is_compressed_tensors_packing_bit_for_bit(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (6, 70), generator=torch.Generator().manual_seed(bits))  # 70: a partial word
    signed = (codes - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors' convention
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.T, bits).T, pack_to_int32(signed, bits, packed_dim=0))  # zero points
    assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, 70), codes)


def _logits(model, tokenizer):
    tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(tokens).logits


def _export(smollm2, compression_plan, out):
    model = copy.deepcopy(smollm2.model)
    report = apply_plan_(model, compression_plan)
    write_compressed_tensors(model, smollm2.tokenizer, report, out, {"model_spec": "builtin:smollm2-135m"})
    return model


@pytest.fixture(scope="module")
def mixed_export(smollm2, module_dir):
    out = module_dir / "mixed"
    return _export(smollm2, MIXED, out), out


def _differing(expected_model, loaded_model) -> list[str]:
    """Names of the engine model's tensors the loaded model does not hold bit for bit (all of them are present)."""
    expected, state = expected_model.state_dict(), loaded_model.state_dict()
    assert set(expected) <= set(state)
    return [key for key, value in expected.items() if not torch.equal(state[key], value)]


@pytest.mark.integration
def test_mixed_plan_writes_llm_compressor_layout(mixed_export):
    from compressed_tensors.quantization import QuantizationConfig
    from safetensors.torch import load_file

    model, out = mixed_export
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)  # what transformers and vLLM parse
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [name for group in parsed.config_groups.values() for name in group.targets]
    assert sorted(targets + parsed.ignore) == sorted(linears) and "lm_head" in parsed.ignore  # each Linear once
    schemes = {(g.weights.num_bits, g.weights.group_size, g.weights.symmetric, g.weights.strategy): len(g.targets)
               for g in parsed.config_groups.values()}
    assert schemes == {(4, 64, False, "group"): 14, (8, None, True, "channel"): 3, (4, 32, True, "group"): 1,
                       (4, 128, False, "group"): 1}
    tensors = load_file(out / "model.safetensors")
    prefix = "model.layers.0.mlp.down_proj"  # (576, 1536), int4 g64 asym
    assert tensors[f"{prefix}.weight_packed"].shape == (576, 1536 // 8)
    assert tensors[f"{prefix}.weight_packed"].dtype == torch.int32
    assert tensors[f"{prefix}.weight_scale"].shape == (576, 24)
    assert tensors[f"{prefix}.weight_zero_point"].shape == (576 // 8, 24)
    assert tensors[f"{prefix}.weight_shape"].tolist() == [576, 1536]
    assert "model.layers.2.mlp.up_proj.weight_zero_point" not in tensors  # symmetric: no zero point
    assert tensors["model.layers.2.mlp.up_proj.weight_scale"].shape == (1536, 1)
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors  # tied: written once
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["max_abs_weight_deviation"] == 0.0 and provenance["model_spec"] == "builtin:smollm2-135m"


@pytest.mark.integration
def test_mixed_plan_decodes_to_the_engine_weights_exactly(mixed_export, smollm2, tmp_path):
    """compressed-tensors' own dequantizer (convert_checkpoint, model-free) turns the export back into a dense
    checkpoint; transformers loads that, and every weight is bit-identical to the engine's quantize-dequantized one
    (float32 model, float32-stored float16 scales: no rounding anywhere), so the logits are identical too."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer
    from transformers import AutoModelForCausalLM

    model, out = mixed_export
    dense = tmp_path / "dense"
    convert_checkpoint(out, dense, CompressedTensorsDequantizer(out, dtype=torch.float32), max_workers=1, device="cpu")
    loaded = AutoModelForCausalLM.from_pretrained(dense)
    assert _differing(model, loaded) == []
    assert torch.equal(_logits(loaded, smollm2.tokenizer), _logits(model, smollm2.tokenizer))


@pytest.mark.integration
def test_transformers_loads_a_symmetric_export_directly(smollm2, tmp_path):
    """AutoModelForCausalLM.from_pretrained(dir) with compressed-tensors installed: packed on load, decompressed on
    CPU at the first forward; then every weight equals the engine's and the logits are identical."""
    from transformers import AutoModelForCausalLM

    model = _export(smollm2, SYMMETRIC, tmp_path / "sym")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sym")
    assert torch.equal(_logits(loaded, smollm2.tokenizer), _logits(model, smollm2.tokenizer))
    assert _differing(model, loaded) == []


@pytest.mark.integration
@pytest.mark.xfail(strict=True, raises=RuntimeError, reason=(
    "transformers 5.24 + compressed-tensors 0.20.1: from_pretrained builds asymmetric pack-quantized modules on the "
    "meta device, where compressed-tensors does not pack the zero point, so the checkpoint's packed (out/8, groups) "
    "zero points are refused as a size mismatch (llm-compressor issue #1618); dequantize=True instead decodes every "
    "module with the first config group's scheme. When this passes, drop the marker and the docstring caveat."))
def test_transformers_loads_an_asymmetric_mixed_export_directly(mixed_export, smollm2):
    from transformers import AutoModelForCausalLM

    model, out = mixed_export
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(loaded, smollm2.tokenizer), _logits(model, smollm2.tokenizer))


def _refusal(rules, tmp_path, **kwargs) -> str:
    from tests.test_evaluate import byte_level_tokenizer

    model = tiny_llama()  # hidden 64, MLP 128, tied embeddings
    report = apply_plan_(model, plan(*rules))
    with pytest.raises(ShrinkError) as error:
        write_compressed_tensors(model, byte_level_tokenizer(), report, tmp_path / "out", {}, **kwargs)
    assert not (tmp_path / "out").exists()
    return str(error.value)


@pytest.mark.parametrize("rules, says", [
    ([{"blocks": [0], "kind": LINEARS, "weights": weights(3, 32, False)}],
     "model.layers.0.self_attn.q_proj is quantized to 3 bits"),
    ([{"blocks": [0], "kind": LINEARS, "weights": weights(4, 128, False)}],
     "model.layers.0.self_attn.q_proj has 64 inputs, not a multiple of its group size 128"),
    ([{"kind": ["embedding"], "weights": weights(8, "channel", True)}], "model.embed_tokens is an embedding"),
    ([{"blocks": [0], "kind": ["q"], "weights": weights(4, 32, False)}], "vLLM fuses q/k/v into one layer"),
    ([{"blocks": [0], "kind": ["down"], "weights": weights(4, 32, True), "activation_bits": 8}],
     "simulates int8 activations"),
    ([{"blocks": [0], "kind": ["down"], "prune": {"structure": "unstructured", "amount": 0.5}}], "quantizes no Linear"),
], ids=["int3", "partial-group", "embedding", "vllm-fused", "simulated-activations", "nothing-quantized"])
def test_refuses_what_compressed_tensors_cannot_express(rules, says, tmp_path):
    assert says in _refusal(rules, tmp_path)


def test_mixed_fused_schemes_export_when_not_for_vllm(tmp_path):
    from tests.test_evaluate import byte_level_tokenizer

    model = tiny_llama()
    report = apply_plan_(model, plan({"blocks": [0], "kind": ["q"], "weights": weights(4, 32, False)}))
    out = write_compressed_tensors(model, byte_level_tokenizer(), report, tmp_path / "out", {}, for_vllm=False)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert [g["targets"] for g in groups.values()] == [["model.layers.0.self_attn.q_proj"]]
