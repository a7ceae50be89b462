"""One byte count from plan to artifact: the resolved table, the apply report and the packed artifact agree exactly,
for bf16 models and for projections with a bias (Qwen2-style q/k/v), across quantization and pruning plans."""
import struct

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.export import write_packed_artifact
from shrink_core.model.inventory import inventory
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import load_plan, resolve
from shrink_core.plan.resolve import totals

LINEARS = "[q, k, v, o, gate, up, down]"
PLANS = {
    "w8": "preset:w8",
    "w4g64": "preset:w4g64",
    "prune50": f"version: 1\nrules:\n  - {{kind: {LINEARS}, prune: {{structure: unstructured, amount: 0.5}}}}\n",
    "w4-2:4": f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: 4, group_size: 32, method: rtn}}, "
              "prune: {structure: nm, n: 2, m: 4}}\n",
    "fp32": f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: 32}}}}\n",
    "fp16": f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: 16}}}}\n",
    "heads50": "version: 1\nrules:\n  - {kind: [q, k, v, o], prune: {structure: heads, amount: 0.5}}\n",
    "w3g32-log8": f"version: 1\nrules:\n  - {{kind: {LINEARS}, weights: {{bits: 3, group_size: 32, scales: log8}}}}\n",
}


def biased_llama(dtype=torch.float32):
    """q/k/v with a bias, as Qwen2 has (attention_bias on a Llama config)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().to(dtype)


MODELS = {
    "bf16": lambda: tiny_llama(layers=2).to(torch.bfloat16),
    "bias": biased_llama,
    "bias-bf16": lambda: biased_llama(torch.bfloat16),
}


def data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file: its size less the 8-byte length and the JSON header."""
    with open(path, "rb") as f:
        header = struct.unpack("<Q", f.read(8))[0]
    return path.stat().st_size - 8 - header


@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("model_name", list(MODELS))
def test_resolved_report_and_artifact_bytes_agree(model_name, plan_name, tmp_path):
    model, plan = MODELS[model_name](), load_plan(PLANS[plan_name])
    predicted = totals(resolve(model, plan))
    whole = totals(resolve(model, plan), inventory(model))  # the Plan page's "Packed size": the whole model
    report = apply_plan_(model, plan, torch.randint(0, 256, (2, 16)))
    t = report.totals
    assert t["packed_bytes"] == predicted["packed_bytes"]
    assert whole["other_bytes"] == t["other_bytes"] > 0
    assert (whole["total_packed_bytes"], whole["total_packed_sparse_bytes"]) == \
        (t["total_packed_bytes"], t["total_packed_sparse_bytes"])
    assert t["total_packed_sparse_bytes"] - t["other_bytes"] == predicted["packed_sparse_bytes"]
    assert t["dense_bytes_before"] - t["other_bytes"] == predicted["dense_bytes"]  # no block removed: norms stay
    assert data_bytes_written(model, report, tmp_path) == t["total_packed_bytes"]


def data_bytes_written(model, report, tmp_path) -> int:
    path = tmp_path / "p.safetensors"
    write_packed_artifact(model, report, path)
    return data_bytes(path)


def test_hand_counted_bytes_of_a_biased_bf16_query_projection():
    """q_proj is 64 x 64 with 64 biases, all bf16 (2 bytes)."""
    def q_row(plan_text):
        rows = resolve(biased_llama(torch.bfloat16), load_plan(plan_text))
        return next(r for r in rows if r.name == "model.layers.0.self_attn.q_proj")

    assert q_row("preset:w8").dense_bytes == 64 * 64 * 2 + 64 * 2
    # int8 per channel, symmetric: 4096 codes + 64 float16 scales, no zeros; the bias stays bf16
    assert q_row("preset:w8").packed_bytes == 4096 + 64 * 2 + 64 * 2
    # 50% unstructured, stored sparse: 2048 kept bf16 values + a 4096-bit bitmap + the bias
    assert q_row(PLANS["prune50"]).sparse_bytes == 2048 * 2 + 512 + 64 * 2
    # half the query heads go: 32 x 64 weights and 32 biases remain
    assert q_row(PLANS["heads50"]).packed_bytes == 32 * 64 * 2 + 32 * 2
    # fp32 asked on a bf16 model: stored as float32 (4 bytes), bias too is kept as loaded
    assert q_row(PLANS["fp32"]).packed_bytes == 64 * 64 * 4 + 64 * 2


def test_fp32_rule_on_a_bf16_model_writes_float32(tmp_path):
    from safetensors.torch import load_file

    model = tiny_llama(layers=1).to(torch.bfloat16)
    report = apply_plan_(model, load_plan(PLANS["fp32"]))
    write_packed_artifact(model, report, tmp_path / "p.safetensors")
    tensors = load_file(str(tmp_path / "p.safetensors"))
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.float32
    assert torch.equal(tensors["model.layers.0.mlp.up_proj.weight"], model.model.layers[0].mlp.up_proj.weight.float())
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16  # no rule: as loaded


@pytest.mark.parametrize("model_name", list(MODELS))
def test_projected_weight_bytes_count_biases(model_name):
    """The perf workload (Plan page roofline, memory) holds the same bytes as the resolved table."""
    from shrink_core.formats import WeightFormat
    from shrink_core.model.inventory import inventory, summary
    from shrink_core.perf.workload import describe_model, workload_from_rows

    model = MODELS[model_name]()
    rows = inventory(model)
    resolved = resolve(model, load_plan("preset:w4g64"))
    specs = {r.name: WeightFormat(r.bits, r.group_size, r.weights.symmetric) for r in resolved if r.weights}
    expected = totals(resolved)["packed_bytes"]
    assert workload_from_rows(rows, summary(model, rows), specs).weight_bytes == expected
    norms = sum(r.bytes for r in rows if r.kind == "norm")
    assert describe_model(model, specs).weight_bytes == expected + norms
