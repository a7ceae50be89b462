"""`export --format gguf` on the real built-in model: the file, dequantized by gguf-py, is bit for bit the candidate the
engine evaluated; its importance matrix is the one the plan quantized with; llama.cpp runs it (when its tools are built)."""
import copy

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.ggml.gguf_file import read_gguf_weights
from shrink_core.compression.ggml.imatrix import read_imatrix
from shrink_core.compression.ggml.types import GgmlState
from shrink_core.compression.gguf_export import gguf_tensors, write_candidate_gguf
from shrink_core.errors import ShrinkError
from shrink_core.plan import load_plan

# one rule per codec family, fallbacks included: 576-wide rows take Q5_0 (for Q4_K), IQ4_NL (for IQ4_XS), Q4_0 (for
# Q3_K); down_proj (1536 wide) takes the K-quants themselves
PLAN = {"version": 1, "name": "mixed llama.cpp types", "rules": [
    {"kind": ["down"], "blocks": "0-14", "weights": {"ggml": "Q4_K", "method": "imatrix"}},
    {"kind": ["down"], "weights": {"ggml": "Q6_K"}},
    {"kind": ["q", "k"], "weights": {"ggml": "Q4_K"}},
    {"kind": ["v", "o"], "weights": {"ggml": "IQ4_XS"}},
    {"kind": ["gate", "up"], "blocks": "0-9", "weights": {"ggml": "Q3_K"}},
    {"kind": ["gate", "up"], "weights": {"ggml": "Q5_K"}},
    {"kind": ["embedding"], "weights": {"ggml": "Q8_0"}},
]}


@pytest.fixture(scope="module")
def exported(smollm2, module_dir):
    model = copy.deepcopy(smollm2.model)
    torch.manual_seed(0)
    calibration = torch.randint(0, smollm2.model.config.vocab_size, (4, 64))
    report = apply_plan_(model, load_plan(PLAN), calibration, recipe={"n_sequences": 4, "seq_len": 64})
    path = module_dir / "candidate.gguf"
    written = write_candidate_gguf(smollm2, model, report, path, {"plan": "mixed"})
    return model, report, written


def test_the_file_is_the_evaluated_candidate_bit_for_bit(exported):
    model, report, written = exported
    stored = {s.stored for s in report.quant_states.values() if isinstance(s, GgmlState)}
    assert {"Q4_K", "Q6_K", "Q5_0", "IQ4_NL", "Q4_0", "Q5_1", "Q8_0"} <= stored  # every family, fallbacks included
    weights = read_gguf_weights(written["gguf"])
    state = model.state_dict()
    assert "lm_head.weight" not in weights  # tied: llama.cpp reads token_embd
    for name, values in weights.items():
        assert torch.equal(values, state[name].float()), name


def test_the_importance_matrix_is_the_one_quantized_with(exported):
    _, report, written = exported
    matrix = read_imatrix(written["imatrix"])
    assert set(matrix.entries) == {f"blk.{b}.ffn_down.weight" for b in range(15)}
    sums, count = matrix.entries["blk.3.ffn_down.weight"]
    mine, tokens = report.importance["model.layers.3.mlp.down_proj"]
    assert torch.equal(sums.float(), mine.float()) and int(count) == tokens == 4 * 64


def test_engine_integer_formats_are_refused_with_the_way_out(smollm2):
    model = copy.deepcopy(smollm2.model)
    report = apply_plan_(model, load_plan({"version": 1, "rules": [{"kind": ["down"], "blocks": [0],
                                                                    "weights": {"bits": 4, "group_size": 64}}]}))
    with pytest.raises(ShrinkError, match="give it a llama.cpp type"):
        gguf_tensors(model, report)


def test_llama_cpp_runs_the_file(exported):
    from shrink_core.perf.llamacpp import bench, default_home, find_tools

    tools = find_tools(default_home())
    if tools is None:
        pytest.skip("llama.cpp's tools are not built here (./run llama-tools builds them)")
    figures = bench(tools, exported[2]["gguf"], threads=1, prompt_tokens=8, gen_tokens=4, repetitions=1)
    assert figures["generation"]["tokens_per_s"] > 0, figures


def test_export_command_writes_the_gguf_and_refuses_a_bad_path(tmp_path, capsys):
    from shrink_core.cli import entry

    plan = tmp_path / "plan.yaml"
    plan.write_text("version: 1\nrules:\n- {kind: [down], weights: {ggml: Q8_0}}\n", encoding="utf-8")
    assert entry.main(["export", "--plan", str(plan), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "x.gguf").stat().st_size > 0
    assert entry.main(["export", "--plan", str(plan), "--format", "gguf", "--out", str(tmp_path / "x.bin")]) == 1
    assert "ending in .gguf" in capsys.readouterr().err


def test_a_rotated_plan_is_refused_by_both_exports_in_one_sentence(tmp_path, capsys):
    from shrink_core.cli import entry

    plan = tmp_path / "rotated.yaml"
    plan.write_text("version: 1\nrotate: hadamard\nrules:\n- {kind: [down], blocks: [0], weights: {bits: 4, "
                    "group_size: 64}}\n", encoding="utf-8")
    assert entry.main(["export", "--plan", str(plan), "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert "input rotated" in err and "which a GGUF file cannot hold" in err
    assert entry.main(["export", "--plan", str(plan), "--format", "compressed-tensors", "--out",
                       str(tmp_path / "ct")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "remove rotate from the plan to export to compressed-tensors" in err
    assert not (tmp_path / "x.gguf").exists()
