"""Sequential onloading (`apply --onload cuda`): the model stays in host memory and each block visits the GPU for its
calibration and compression. Here without a GPU: the per-block arguments taken without running the blocks are the
ones a full forward hands them, the onload path (forced onto the CPU) gives the same bits as the plain one, and a
device this machine lacks is refused in one sentence. On a GPU (marked `gpu`): the same figures, the model back in
host memory, and the GPU's peak about one block."""
import json

import pytest
import torch

from shrink_core.compression import apply as apply_module
from shrink_core.compression.apply import apply_plan_
from shrink_core.errors import ModelLoadError
from shrink_core.model.arch import block_kwargs, decoder_layers
from shrink_core.model.toy import FAMILIES, tiny_family, tiny_llama
from shrink_core.plan import load_plan

NO_CUDA = not torch.cuda.is_available()
GPTQ = {"version": 1, "name": "gptq", "rules": [{"kind": ["q", "k", "v", "o", "gate", "up", "down"],
                                                   "weights": {"bits": 4, "group_size": 32, "method": "gptq"}}]}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b)  # caches and configs: the same kind of object (None stays None)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_blocks_arguments_are_the_same_without_running_the_blocks(family):
    model = tiny_family(family)
    ids = torch.randint(3, 250, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ran = block_kwargs(model, ids)
        passed = block_kwargs(model, ids, run_blocks=False)
    assert len(ran) == len(passed) == len(decoder_layers(model))
    assert all(_same(a, b) for a, b in zip(ran, passed))
    assert all("forward" not in layer.__dict__ for layer in decoder_layers(model))  # the blocks run again after
    if family == "gemma3_text":  # local and global blocks get different masks: taken per block, not from the first
        assert not _same(passed[0], passed[1])


@pytest.mark.parametrize("method,rotate", [("gptq", False), ("gptq-seq", False), ("gptq-seq", True)])
def test_the_onload_path_gives_the_plain_paths_bits(monkeypatch, method, rotate):
    """The onload path forced onto the CPU (where a GPU would be): blocks that pass their input through for the
    per-block arguments, inputs and states moved, and the same weights, bit for bit (gptq-seq: with the
    full-precision block copy and its stream too; rotated: each block's rotations made and folded back there)."""
    plan = {**GPTQ, "rules": [{**GPTQ["rules"][0], "weights": {**GPTQ["rules"][0]["weights"], "method": method}}],
            **({"rotate": "hadamard"} if rotate else {})}
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(1))
    plain, onloaded = tiny_llama(seed=3), tiny_llama(seed=3)
    # the forwards as the model is on both sides (onloading never uses the CPU's bf16 autocast for fp32 models)
    monkeypatch.setattr(apply_module.calibrate, "fast_forward_dtype", lambda model: None)
    apply_plan_(plain, load_plan(plan), ids, batch_size=4)
    monkeypatch.setattr(apply_module, "onload_for", lambda model, onload: torch.device("cpu"))
    report = apply_plan_(onloaded, load_plan(plan), ids, batch_size=4, onload="cuda")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), onloaded.state_dict().values()))
    assert any("sequential onloading" in note for note in report.notes)
    assert report.quant_states and all(s.scale.device.type == "cpu" for s in report.quant_states.values())
    assert all((s.rotation is not None) == rotate for s in report.quant_states.values())


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "opt", "gpt2", "qwen2_moe"])
def test_onloaded_evaluation_gives_the_plain_figures(monkeypatch, family):
    """Every batch through one block at a time (the onload path, forced onto the CPU) against the plain forward per
    batch: padded batches of different lengths, NLL and KL against a reference, and progress that only moves on."""
    from shrink_core.evaluation.evaluate import Request, score
    from shrink_core.model import load as load_module

    model, reference = tiny_family(family), tiny_family(family, seed=1)
    draw = torch.Generator().manual_seed(0)
    requests = [Request(item=i, ids=torch.randint(3, 250, (n,), generator=draw).tolist(), score_from=1)
                for i, n in enumerate([40, 33, 17, 40, 8, 25])]
    plain = score(model, requests, reference, max_batch_tokens=96)
    seen = []
    monkeypatch.setattr(load_module, "onload_for", lambda model, onload=None: torch.device("cpu"))
    onloaded = score(model, requests, reference, max_batch_tokens=96, progress=seen.append)
    for a, b in zip(plain, onloaded):  # the same operations in the same order: the same bits
        assert (b.tokens, b.nll, b.kl_values.tolist()) == (a.tokens, a.nll, a.kl_values.tolist())
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) > len(decoder_layers(model))


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_onloading_to_a_gpu_this_machine_lacks_is_refused_in_one_sentence():
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ModelLoadError, match=r"^This machine has no CUDA GPUs that torch can use, so --onload cuda has "
                                             r"no device to send the blocks to; leave --onload out to run where "
                                             r"the model is\.$"):
        apply_plan_(tiny_llama(), load_plan(GPTQ), ids, onload="cuda")
    from tests.test_cli import cli

    for command in (["apply", "--plan", "preset:w4g64", "--out", "/nonexistent/never-written"], ["eval"]):
        refused = cli(*command, "--model", "builtin:smollm2-135m", "--onload", "cuda")
        assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
            "error: This machine has no CUDA GPUs that torch can use, so --onload cuda has no device to send the "
            "blocks to; leave --onload out to run where the model is.")
    model = tiny_llama()
    before = [p.clone() for p in model.parameters()]
    report = apply_plan_(model, load_plan(GPTQ), ids, onload="cpu")  # the model's own device: nothing to onload
    assert not any("onloading" in note for note in report.notes)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_onloaded_gptq_matches_gptq_on_the_gpu_and_holds_one_block():
    """The same model compressed on the GPU and onloaded to it: the same quality (GPTQ's rounding of a random tiny
    model flips codes on float32 differences of a few ulps, as between CPU and GPU: 8% of a weight's norm was seen
    there, so figures are compared, not bits), the model back in host memory, and a peak of about one block."""
    ids = torch.randint(0, 256, (8, 48), generator=torch.Generator().manual_seed(1))
    on_gpu, onloaded = tiny_llama(seed=3, layers=16).to("cuda"), tiny_llama(seed=3, layers=16)
    apply_plan_(on_gpu, load_plan(GPTQ), ids, batch_size=4)  # also makes cuBLAS's and cuSOLVER's workspaces (68 MB)
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    report = apply_plan_(onloaded, load_plan(GPTQ), ids, batch_size=4, onload="cuda")
    peak = torch.cuda.max_memory_allocated() - before
    assert all(p.device.type == "cpu" for p in onloaded.parameters())
    assert all(s.scale.device.type == "cpu" for s in report.quant_states.values())
    block_bytes = sum(p.numel() * p.element_size() for p in decoder_layers(onloaded)[0].parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in onloaded.parameters())
    assert block_bytes < peak < model_bytes / 2  # one block, its statistics and activations: not the model
    held_out = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.no_grad():
        losses = [float(m.to("cuda")(input_ids=held_out, labels=held_out).loss) for m in (on_gpu, onloaded)]
        reference = float(tiny_llama(seed=3, layers=16).cuda()(input_ids=held_out, labels=held_out).loss)
    assert losses[1] == pytest.approx(losses[0], rel=2e-2) and losses[1] != reference


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_apply_onload_on_the_cli_records_it(toy_dir, shrink_home, tmp_path):
    from tests.test_cli import cli

    run = cli("apply", "--model", str(toy_dir), "--plan", "preset:w4g64", "--onload", "cuda", "--out",
              str(tmp_path / "candidate"), "--json")
    assert run.returncode == 0, run.stderr[-3000:]
    provenance = json.loads((tmp_path / "candidate" / "provenance.json").read_text())
    assert provenance["onload"] == "cuda" and provenance["model_spec"].endswith("#bf16@cpu")
    assert any("sequential onloading" in note for note in provenance["notes"])


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_eval_onload_on_the_cli_gives_the_gpu_figures(toy_dir, shrink_home):
    from tests.test_cli import cli

    figures = {}
    for name, flags in (("onloaded", ["--onload", "cuda"]), ("on the GPU", ["--device", "cuda", "--dtype", "bf16"])):
        run = cli("eval", "--model", str(toy_dir), "--slices", "en", "--json", *flags)
        assert run.returncode == 0, run.stderr[-3000:]
        figures[name] = json.loads(run.stdout.strip().splitlines()[-1])
    onloaded, on_gpu = figures["onloaded"], figures["on the GPU"]
    assert onloaded["onload"] == "cuda" and onloaded["device"].startswith("cpu bf16")
    assert onloaded["slices"]["en"]["ppl"] == pytest.approx(on_gpu["slices"]["en"]["ppl"], rel=1e-3)
