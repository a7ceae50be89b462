"""Perf code that runs models: workload description, the low-bit runtime, measured latency, the full report, CLI."""
import json

import pytest
import torch

from shrink_core.compression.candidate import from_plan
from shrink_core.formats import WeightFormat
from shrink_core.perf.hardware import get
from shrink_core.perf.latency import measure_latency
from shrink_core.perf.lowbit import lowbit_copy
from shrink_core.perf.report import measure
from shrink_core.perf.workload import describe_model, uniform_bits


def _rtn_int4(weight, group):
    out, inp = weight.shape
    g = weight.reshape(out, inp // group, group)
    low, high = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-8)
    return (((g - low) / scale).round().clamp(0, 15) * scale + low).reshape(out, inp)


def test_describe_model_counts_tied_weights_once_and_packs_bits(tiny_model):
    dense = describe_model(tiny_model)
    assert dense.params == sum(p.numel() for p in tiny_model.parameters())
    assert dense.weight_bytes == 4 * dense.params
    lm_head = next(m for m in dense.modules if m.kind == "lm_head")
    assert lm_head.params == 0 and lm_head.read_bytes == 256 * 64 * 4  # tied: stored once, still read every step
    w4 = describe_model(tiny_model, uniform_bits(tiny_model, 4, 64))
    assert len([m for m in w4.modules if m.bits == 4]) == 21
    assert w4.weight_bytes < dense.weight_bytes / 2


def test_describe_model_finds_two_four_zeros_in_float_weights(tiny_model):
    weight = tiny_model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight.view(-1, 4)[:, :2] = 0
    module = next(m for m in describe_model(tiny_model).modules if m.name.endswith("0.mlp.up_proj"))
    assert module.sparse_pattern == "2:4" and module.zero_share >= 0.5


def test_lowbit_int4_matches_the_dequantized_reference(tiny_model):
    bits = uniform_bits(tiny_model, 4, 64)
    candidate, report = lowbit_copy(tiny_model, bits)
    assert report.complete and len(report.packed) == 21
    assert type(candidate.model.layers[0].mlp.up_proj).__name__ == "Int4WeightLinear"
    assert isinstance(tiny_model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # the original is untouched
    reference = __import__("copy").deepcopy(tiny_model)
    with torch.no_grad():
        for name in bits:
            linear = reference.get_submodule(name)
            linear.weight.copy_(_rtn_int4(linear.weight, 64))
        ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
        packed_logits, fake_logits = candidate(ids).logits, reference(ids).logits
        dense_logits = tiny_model(ids).logits
    # bf16 activations and scales: close to the fake-quantized model, much closer than to the unquantized one
    assert (packed_logits - fake_logits).abs().max() < 0.3 * (dense_logits - fake_logits).abs().max() + 0.02


def test_lowbit_says_what_it_cannot_express(tiny_model):
    bits = {"model.layers.0.mlp.up_proj": WeightFormat(3, 64), "model.layers.0.mlp.down_proj": WeightFormat(8, 64),
            "model.layers.1.mlp.up_proj": WeightFormat(8, None, True), "model.embed_tokens": WeightFormat(4, 64),
            "model.layers.2.mlp.up_proj": WeightFormat(8, None, False)}
    candidate, report = lowbit_copy(tiny_model, bits)
    reasons = dict(report.not_expressed)
    assert set(reasons) == {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj", "model.embed_tokens",
                            "model.layers.2.mlp.up_proj"}
    assert "no zero point" in reasons["model.layers.2.mlp.up_proj"]
    assert "3-bit" in reasons["model.layers.0.mlp.up_proj"] and "per output channel" in reasons["model.layers.0.mlp.down_proj"]
    assert report.packed == ("model.layers.1.mlp.up_proj",) and not report.complete
    assert report.to_dict()["not_expressed"][0]["why"]


def test_lowbit_keeps_a_partial_last_group_in_float(tiny_model):
    """The aten int4 kernel needs whole groups: a g128 module with 64 inputs stays float and says so."""
    bits = {"model.layers.0.self_attn.q_proj": WeightFormat(4, 128), "model.layers.0.mlp.down_proj": WeightFormat(4, 128)}
    candidate, report = lowbit_copy(tiny_model, bits)  # q: 64 inputs (partial group); down: 128 inputs (one group)
    reasons = dict(report.not_expressed)
    assert set(reasons) == {"model.layers.0.self_attn.q_proj"} and "divisible" in reasons["model.layers.0.self_attn.q_proj"]
    assert report.packed == ("model.layers.0.mlp.down_proj",)
    assert isinstance(candidate.get_submodule("model.layers.0.self_attn.q_proj"), torch.nn.Linear)


def test_measured_latency_carries_device_runtime_runs(tiny_model):
    threads_before = torch.get_num_threads()
    results = measure_latency({"a": tiny_model, "b": tiny_model}, {"b": "label-b"}, batches=(1, 2), prompt_tokens=8,
                              decode_tokens=3, runs=3, warmup=1, threads=1)
    assert torch.get_num_threads() == threads_before
    assert {(r.candidate, r.batch) for r in results} == {("a", 1), ("a", 2), ("b", 1), ("b", 2)}
    row = next(r for r in results if r.candidate == "b" and r.batch == 2).to_dict()
    assert row["kind"] == "measured" and row["runtime"] == "label-b" and row["threads"] == 1 and row["runs"] == 3
    assert "cores" in row["device"] and len(row["decode_ms_per_token"]["samples_ms"]) == 3
    assert row["decode_ms_per_token"]["min_ms"] <= row["decode_ms_per_token"]["median_ms"] <= row["decode_ms_per_token"]["max_ms"]
    assert row["decode_tokens_per_s"] == pytest.approx(2000 / row["decode_ms_per_token"]["median_ms"], rel=1e-3)
    with pytest.raises(ValueError):
        measure_latency({"a": tiny_model}, runs=0)


def test_full_report_labels_every_figure(tiny_model):

    candidate = from_plan(tiny_model, "preset:w4g64")
    assert len(candidate.bits) == 21 and any("rtn" in n for n in candidate.notes)
    report = measure(tiny_model, candidate, get("l4"), batches=(1, 2), prompt_tokens=8, decode_tokens=2, runs=1,
                     warmup=0, threads=1, context=128)
    data = report.to_dict()
    assert data["memory"]["weights"]["source"] == "engine packed bytes"
    assert data["memory"]["peak_resident"]["kind"] == "measured" and data["memory"]["fits"]["kind"] == "projected"
    assert {m["kind"] for m in data["latency"]["measured"]} == {"measured"}
    assert {m["candidate"] for m in data["latency"]["measured"]} == {"reference", "w4g64"}
    assert {p["kind"] for p in data["latency"]["projected"]} == {"projected"}
    assert {p["target"] for p in data["latency"]["projected"]} == {"l4", "this-machine"}
    assert "fitted to" in data["latency"]["this_machine_model"]["calibrated_from"]
    assert data["latency"]["lowbit_runtime"]["complete"] is True
    assert data["latency"]["lowbit_runtime"]["max_weight_error"] < 2e-3  # the engine's own grid; bf16 scales only
    assert data["cost"] and {c["kind"] for c in data["cost"]} == {"projected"}
    assert len(data["latency"]["projection_error_here"]) == 4
    json.dumps(data)


def test_cli_lists_targets_and_refuses_a_bad_one(capsys):
    from shrink_core.cli.entry import main

    assert main(["measure", "--list-targets"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert "h100-sxm" in names and "raspberry-pi-5" in names
    assert main(["measure", "--target", "tpu-v9"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: Unknown target 'tpu-v9'")
    assert main(["measure", "--runs", "0"]) == 1
    assert "--runs must be at least 1" in capsys.readouterr().err
    assert main(["measure", "--plan", "preset:nope"]) == 1  # a bad plan is refused before the model loads
    assert "Unknown plan preset 'nope'" in capsys.readouterr().err


@pytest.fixture
def one_thread():
    """2 threads on a 2-core machine shared with other jobs make every parallel op wait for a time slice (~15x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.integration
def test_measure_real_model_w4(smollm2, one_thread):

    candidate = from_plan(smollm2.model, "preset:w4g64")
    report = measure(smollm2.model, candidate, get("h100-sxm"), batches=(1,), prompt_tokens=16, decode_tokens=4,
                     runs=1, warmup=0, threads=1)
    data = report.to_dict()
    assert data["latency"]["lowbit_runtime"]["packed_modules"] == 210 and data["latency"]["lowbit_runtime"]["complete"]
    absmax = max(float(candidate.model.get_submodule(n).weight.detach().abs().max()) for n in candidate.bits)
    assert data["latency"]["lowbit_runtime"]["max_weight_error"] < 0.01 * absmax  # engine grid, bf16 scales only
    # 4-bit block linears + fp32 tied embedding (28.3M params): far below the 538 MB fp32 reference
    assert 120e6 < data["memory"]["weights"]["bytes"] < 200e6
    projected = next(p for p in data["latency"]["projected"] if p["target"] == "h100-sxm")
    assert projected["decode_bound"] == "launch overhead"  # docs/anchors.md: a 135M model is launch-bound on an H100


def test_bandwidth_probe_reads_every_linear_weight(tiny_model):
    from shrink_core.perf.latency import measure_bandwidth, measure_with_probes

    linear_bytes = sum(m.weight.numel() * 4 for m in tiny_model.modules() if isinstance(m, torch.nn.Linear))
    alone = measure_bandwidth(tiny_model, runs=3, threads=1)
    assert alone.matrix_bytes == linear_bytes and len(alone.samples_gb_per_s) == 3 and alone.bytes_per_s > 0
    results, bandwidth, overhead = measure_with_probes({"a": tiny_model}, tiny_model, batches=(1,), prompt_tokens=4,
                                                       decode_tokens=2, runs=2, warmup=1, threads=1)
    assert len(results) == 1 and len(bandwidth.samples_gb_per_s) == 2 and len(overhead.step_ms.samples_ms) == 2
    row = bandwidth.to_dict()
    assert row["kind"] == "measured" and "interleaved" in row["what"] and row["threads"] == 1
    assert overhead.layers == tiny_model.config.num_hidden_layers and overhead.to_dict()["kind"] == "measured"


def test_same_depth_toy_keeps_depth_and_shrinks_width():
    from shrink_core.model.toy import tiny_llama
    from shrink_core.perf.latency import same_depth_toy

    source = tiny_llama(layers=5, hidden=128)
    toy = same_depth_toy(source)
    assert toy.config.num_hidden_layers == 5 and toy.config.hidden_size == 64 and toy.config.vocab_size == 256
    assert source.config.hidden_size == 128  # the source model's config is untouched


def test_target_this_machine_uses_the_calibrated_row(tiny_model):
    from shrink_core.perf.candidate import reference
    from shrink_core.perf.report import measure

    report = measure(tiny_model, reference(tiny_model), get("this-machine"), batches=(1,), prompt_tokens=4,
                     decode_tokens=2, runs=1, warmup=0, threads=1, context=16)
    projected = report.to_dict()["latency"]["projected"]
    assert [p["target"] for p in projected] == ["this-machine"] and "fitted to" in projected[0]["model"]
    assert report.cost == () and any("no price" in n for n in report.notes)
    assert report.speedup(1) is None  # no distinct candidate to compare
