"""Peak memory predicted before a job runs: parts that add up, one refusing sentence that says what would fit, the
refusal as a new user meets it (CLI, nothing stored), and the prediction against measured peak RSS on the built-in
model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from shrink_core.errors import ShrinkError
from shrink_core.perf import footprint
from shrink_core.perf.footprint import ModelFacts

ROOT = Path(__file__).resolve().parent.parent
EIGHT_B = ModelFacts(params=8_030_261_248, dtype="bf16", hidden=4096, intermediate=14336, vocab=128256, blocks=32,
                     linear_params=6_979_321_856, largest_linear=14336 * 4096, largest_input=14336)


def test_parts_add_up_and_scale_with_the_dtype():
    fp32 = ModelFacts(**{**EIGHT_B.__dict__, "dtype": "fp32"})
    for make in (lambda f: footprint.evaluation(f), lambda f: footprint.apply(f, (16, 512)),
                 lambda f: footprint.scan(f, "fast", (4, 64), (4, 64), 4)):
        a, b = make(EIGHT_B), make(fp32)
        assert a.total == sum(a.parts.values()) and b.parts["weights"] == 2 * a.parts["weights"]
        assert a.to_dict()["kind"] == "projected"
    fisher = footprint.fisher_phase(EIGHT_B, (8, 128), 4)
    assert fisher["fisher statistics"] < 1e9  # streamed: 56 GB of statistics are never kept
    scan = footprint.scan(EIGHT_B, "fast", (8, 128), (8, 128), 4)  # the larger phase: the embedding's probe here
    assert scan.total == max(sum(fisher.values()), scan.total - scan.parts["process"] - scan.parts["weights"]) + (
        scan.parts["process"] + scan.parts["weights"]) and "perturbed copy" in scan.parts
    # an extra slice adds nothing that stays: the scan's footprint does not depend on the slice count at all
    assert footprint.scan(EIGHT_B, "fast", (4, 64), (4, 64), 4).total < EIGHT_B.params * 2 * 1.3


def test_the_fisher_pass_keeps_its_graph_bounded_and_the_errors_a_block_of_rows_at_a_time():
    """An 8B's depths recompute their blocks (4 x 64 tokens would keep 2 GiB of graph, 8 x 256 17 GB); standard
    runs 3 sequences at a time, so every depth's pass keeps at most 2 GiB of graph; the built-in model's quick depth
    keeps its graph (0.4 GB). A setting that ranks the whole matrix (magnitude pruning) meets its error whole."""
    assert footprint.backward_activations(EIGHT_B, 4 * 64) == 2 << 30
    passes = [footprint.fisher_pass(EIGHT_B, n, length, 4) for n, length in ((4, 64), (8, 128), (16, 256))]
    assert passes == [(4, True), (4, True), (3, True)]
    assert all(footprint.backward_activations(EIGHT_B, b * length, True) <= footprint.BACKWARD_BYTES
               for (b, _), length in zip(passes, (64, 128, 256)))
    small = ModelFacts(params=134_515_008, dtype="fp32", hidden=576, intermediate=1536, vocab=49152, blocks=30,
                       linear_params=106_168_320, largest_linear=1536 * 576, largest_input=1536)
    assert footprint.fisher_pass(small, 4, 64, 4) == (4, False)  # the built-in model's batches are the depth's own
    assert footprint.fisher_pass(small, 16, 256, 4) == (8, True)
    fast = [footprint.fisher_phase(EIGHT_B, (8, 128), 4, whole) for whole in (False, True)]
    assert fast[0]["backward activations"] <= footprint.BACKWARD_BYTES
    assert footprint.scan(EIGHT_B, "fast", (8, 128), (8, 128), 4).total < 20e9
    assert sum(fast[1].values()) - sum(fast[0].values()) == 3 * 4 * EIGHT_B.largest_linear - 8 * footprint.ROW_CHUNK_BYTES


def test_a_job_that_will_not_fit_is_refused_in_one_sentence_that_says_what_fits():
    fp32 = ModelFacts(**{**EIGHT_B.__dict__, "dtype": "fp32"})
    with pytest.raises(ShrinkError) as caught:
        footprint.admit(lambda f: footprint.evaluation(f), fp32, available=int(20e9))
    sentence = str(caught.value)
    assert sentence.startswith("This evaluation would need about 33.")
    assert "this machine has 20.0 GB available; the model in bf16 (spec suffix #bf16) would need about" not in sentence
    assert "the model in bf16 (spec suffix #bf16) would need 17.0 GB" in sentence and sentence.endswith("and fits.")
    with pytest.raises(ShrinkError, match=r"available; free memory or use a machine with more\.$"):
        footprint.admit(lambda f: footprint.evaluation(f), fp32, available=int(4e9))
    assert footprint.admit(lambda f: footprint.evaluation(f), EIGHT_B, available=int(40e9)).total < 40e9


def test_the_cli_refuses_before_any_work_and_stores_nothing(tmp_path, shrink_home):
    from shrink_core.model.toy import tiny_llama

    from .test_export import tiny_tokenizer

    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    env = {**__import__("os").environ, "SHRINK_HOME": str(shrink_home), "SHRINK_MEMORY_LIMIT_GB": "0.3"}
    run = subprocess.run([sys.executable, "-m", "shrink_core", "sensitivity", "--model", str(tmp_path / "m"),
                          "--slices", "en", "--settings", "w4g64", "--method", "fast", "--depth", "quick"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    message = run.stderr.strip()
    assert message.startswith("error: This fast scan would need about 0.") and message.count("\n") == 0
    assert "this machine has 0.3 GB available" in message
    from shrink_core.results.store import Store

    assert Store(shrink_home / "store.sqlite").results("sensitivity") == []


MEASURE = """
import json, sys
from shrink_core.model.load import load
from shrink_core.perf import footprint
from shrink_core.perf.memory import measure_peak_rss
stage = sys.argv[1]
loaded = load("builtin:smollm2-135m")  # a first load may convert the GGUF: the peak is measured from here on
facts = footprint.facts_from_model(loaded.model)
if stage == "eval":
    from shrink_core.evaluation.evaluate import evaluate
    from shrink_core.evaluation.protocol import Protocol
    from shrink_core.evaluation.slices import get_slice
    run = lambda: evaluate(loaded.model, loaded.tokenizer, [get_slice("en")], Protocol("t", 24, 24, 1, 512, 512))
    predicted = footprint.evaluation(facts, 1024)
elif stage == "scan":
    from shrink_core.results.store import Store
    from shrink_core.sensitivity.scan import run_scan
    run = lambda: run_scan(loaded, ["en"], ["w4g64"], "fast", "quick", metrics=("kl",), store=Store())
    predicted = footprint.scan(facts, "fast", (4, 64), (4, 64), 4)
print(json.dumps({"predicted": predicted.total, "measured": measure_peak_rss(run).peak_rss_bytes}))
"""


@pytest.mark.integration
@pytest.mark.parametrize("stage", ["eval", "scan"])
def test_the_prediction_holds_on_the_builtin_model(stage, smollm2, shrink_home):
    run = subprocess.run([sys.executable, "-c", MEASURE, stage], cwd=ROOT, capture_output=True, text=True,
                         timeout=900, env={**__import__("os").environ, "SHRINK_HOME": str(shrink_home)})
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0.8 < figures["measured"] / figures["predicted"] < 1.25, figures


def test_a_model_already_loaded_counts_as_resident_not_as_still_to_come():
    make = footprint.evaluation  # 8B bf16: 16.1 GB of weights, about 0.5 GB of logits beside them
    with pytest.raises(ShrinkError):
        footprint.admit(make, EIGHT_B, available=int(2.5e9))
    assert footprint.admit(make, EIGHT_B, available=int(2.5e9), loaded=True).total > 17e9
    with pytest.raises(ShrinkError):
        footprint.admit(make, EIGHT_B, available=int(0.3e9), loaded=True)


def test_a_sequential_method_adds_its_full_precision_side():
    plain, sequential = footprint.apply(EIGHT_B, (64, 512)), footprint.apply(EIGHT_B, (64, 512), sequential=True)
    added = {k: v for k, v in sequential.parts.items() if k not in plain.parts}
    tokens = 64 * 512
    assert added == {"full-precision block": 6_979_321_856 // 32 * 2, "full-precision stream": tokens * 4096 * 2,
                     "full-precision inputs": tokens * 2 * 14336 * 4,
                     "settled attention outputs": tokens * 4096 * 4}
    assert 3.7e9 < added["full-precision inputs"] < 3.8e9  # what gptq-seq keeps of an 8B block at 64 x 512 tokens


def test_end_to_end_tuning_is_a_phase_of_its_own_and_the_larger_phase_counts():
    from shrink_core.plan import dump_plan
    from shrink_core.plan.presets import preset
    from shrink_core.results.eval_run import apply_shape

    assert apply_shape(dump_plan(preset("w3g64-rot-tuned"))) == ((64, 512), True, (2, 512))
    assert apply_shape(dump_plan(preset("w3g64-rot")))[2] is None
    calibrating = footprint.apply(EIGHT_B, (64, 512), sequential=True)
    tuned = footprint.apply(EIGHT_B, (64, 512), sequential=True, tune=(2, 512))
    assert tuned.parts["tuned codes and weights"] == EIGHT_B.linear_params * 14
    assert "hessians" not in tuned.parts and "full-precision inputs" not in tuned.parts  # freed before tuning
    assert 120e9 < tuned.total < 135e9 and calibrating.total < 30e9  # an 8B's tuning needs a big machine: said first
    small = ModelFacts(**{**EIGHT_B.__dict__, "linear_params": 1000, "vocab": 10, "blocks": 1})
    assert footprint.apply(small, (64, 512), sequential=True, tune=(2, 512)).parts == footprint.apply(
        small, (64, 512), sequential=True).parts  # where calibrating costs more, its phase is the one counted


def test_a_gpu_job_is_admitted_against_the_gpu_and_offered_the_cpu(monkeypatch):
    """On a GPU the room is the GPU's free memory; a job that fits there in no dtype is offered the CPU, from a new
    load, when the machine's memory holds it (the GPU here is simulated: free memory per device)."""
    from dataclasses import replace

    room = {"cuda": int(10e9), "cpu": int(40e9)}
    monkeypatch.setattr(footprint, "available_bytes", lambda device="cpu": room[device])
    on_gpu = replace(EIGHT_B, device="cuda")
    scan = lambda f: footprint.scan(f, "fast", (4, 64), (4, 64), 4)  # noqa: E731
    with pytest.raises(ShrinkError) as caught:
        footprint.admit(scan, on_gpu)
    assert str(caught.value) == (f"This fast scan would need {scan(on_gpu).describe()}, and the cuda device has 10.0 "
                                 f"GB available; on the CPU (spec suffix @cpu) it would need "
                                 f"{scan(EIGHT_B).total / 1e9:.1f} GB and fits.")
    room["cpu"] = int(5e9)
    with pytest.raises(ShrinkError, match=r"the cuda device has 10\.0 GB available; free memory or use a machine"):
        footprint.admit(scan, on_gpu)
    room["cuda"] = int(1e9)  # loaded on the GPU: its weights are not in host memory, so the host's 5 GB do not do
    with pytest.raises(ShrinkError, match=r"the cuda device has 1\.0 GB available; free memory or use a machine"):
        footprint.admit(scan, on_gpu, loaded=True)
    room["cpu"] = int(scan(EIGHT_B).total - footprint.PROCESS_BYTES + 1e6)  # this process is the only part there
    with pytest.raises(ShrinkError, match=r"on the CPU \(spec suffix @cpu\) it would need 18\.\d GB and fits\.$"):
        footprint.admit(scan, on_gpu, loaded=True)
    room["cuda"] = int(21e9)  # fp32 does not fit the GPU, bf16 does: bf16 on the GPU is offered first
    with pytest.raises(ShrinkError) as caught:
        footprint.admit(scan, replace(on_gpu, dtype="fp32"))
    assert str(caught.value).endswith(f"the model in bf16 (spec suffix #bf16) would need "
                                      f"{scan(on_gpu).total / 1e9:.1f} GB and fits.")
    assert footprint.admit(scan, on_gpu).total < 21e9
    described = {"summary": {"parameters": 1, "dtype": "bfloat16"}, "modules": [],
                 "device": "cuda bf16 (NVIDIA H100 80GB HBM3, torch 2.13.0)"}
    assert footprint.facts_from_description(described).device == "cuda"
    assert footprint.facts_from_description({**described, "device": None}).device == "cpu"
    assert footprint.facts_from_description({**described, "device": "cuda:1 bf16 (H100, torch)"}).device == "cuda:1"
