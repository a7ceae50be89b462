"""Where a model runs: an `@device` spec suffix (or --device / the Model page), `auto` a CUDA GPU where torch sees
one and the CPU otherwise; every path puts its token ids on the model's device. The CUDA test runs only where a GPU
is lent (marked `gpu`)."""
import json

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.errors import ModelLoadError
from shrink_core.evaluation.evaluate import Request, score
from shrink_core.model.describe import device_label
from shrink_core.model.load import ModelSpec, load, resolve_device, resolve_dtype, with_device, with_dtype
from shrink_core.plan import load_plan
from shrink_core.runtime.sweep import pinned_spec
from shrink_core.sensitivity import fisher
from shrink_core.sensitivity.probe import ProbeCache, probe
from shrink_core.sensitivity.settings import SETTINGS

from .test_dtype import model_dir  # noqa: F401 (fixture)

NO_CUDA = not torch.cuda.is_available()


def test_the_device_suffix_parses_and_composes_with_the_dtype():
    spec = ModelSpec.parse("builtin:smollm2-135m#bf16@cuda:1")
    assert (spec.kind, spec.target, spec.dtype, spec.device) == ("builtin", "smollm2-135m", "bf16", "cuda:1")
    assert ModelSpec.parse("builtin:smollm2-135m").device == "auto"
    assert with_device(with_dtype("builtin:smollm2-135m", "bf16"), "cpu") == "builtin:smollm2-135m#bf16@cpu"
    assert with_dtype("builtin:smollm2-135m@cpu", "fp16") == "builtin:smollm2-135m#fp16@cpu"  # the device stays
    assert with_device("builtin:smollm2-135m#bf16@cuda", "mps") == "builtin:smollm2-135m#bf16@mps"
    assert with_device("builtin:smollm2-135m@cpu", "auto") == "builtin:smollm2-135m@cpu"
    before = ModelSpec.parse("builtin:smollm2-135m@cpu#bf16")  # the device before the dtype: the same model
    assert (before.dtype, before.device) == ("bf16", "cpu")
    assert with_device("builtin:smollm2-135m@cpu#bf16", "cuda") == "builtin:smollm2-135m#bf16@cuda"
    # a head without a GPU pins a GPU spec's dtype for its workers without refusing the device it lacks
    assert pinned_spec("builtin:smollm2-135m@cuda:1") == "builtin:smollm2-135m#bf16@cuda:1"
    assert pinned_spec("builtin:smollm2-135m@cpu") == "builtin:smollm2-135m#fp32@cpu"
    with pytest.raises(ModelLoadError, match=r"^Unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps\.$"):
        with_device("builtin:smollm2-135m", "gpu")
    # auto: this machine's behaviour without a GPU (fp32 on the CPU); an explicit CPU keeps fp32 on a GPU machine
    assert resolve_device("auto") == ("cpu" if NO_CUDA else "cuda")
    assert resolve_dtype("auto", "cpu") == "fp32" and resolve_dtype("bf16", "cpu") == "bf16"


@pytest.mark.skipif(not NO_CUDA, reason="this machine has a CUDA GPU")
def test_a_device_this_machine_lacks_is_refused_in_one_sentence(model_dir, shrink_home):  # noqa: F811
    from tests.test_cli import cli

    with pytest.raises(ModelLoadError, match=r"^This machine has no CUDA GPUs that torch can use, so 'cuda' is not "
                                             r"there; use @cpu \(--device cpu\) or auto\.$"):
        load(f"{model_dir}@cuda")
    refused = cli("inspect", "--model", str(model_dir), "--device", "cuda:1")
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1] == (
        "error: This machine has no CUDA GPUs that torch can use, so 'cuda:1' is not there; use @cpu (--device cpu) "
        "or auto.")
    unknown = cli("inspect", "--model", str(model_dir), "--device", "gpu")
    assert unknown.returncode == 2 and "'gpu' is not a device; use auto, cpu, cuda, cuda:N or mps" in unknown.stderr


def test_the_cli_flag_becomes_the_spec_suffix_and_the_cpu_is_the_same_model(model_dir, shrink_home, capsys):  # noqa: F811
    from shrink_core.cli.entry import main

    assert main(["inspect", "--model", str(model_dir), "--device", "cpu", "--dtype", "bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == f"{model_dir}#bf16@cpu" and report["device"].startswith("cpu bf16")
    default, on_cpu = load(str(model_dir)), load(f"{model_dir}@cpu")
    assert default.weights_hash == on_cpu.weights_hash  # the same weights; the spec keeps their figures apart
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    figures = _figures(default.model, ids)
    assert figures == _figures(on_cpu.model, ids)
    nll, fast, kl, compressed = figures
    assert fast[0] > 0 and kl > 0 and compressed != nll and all(0 < x < 1e4 for x in nll + compressed)


def _figures(model, ids):
    """Evaluation NLLs, the fast scan's scores, a probe's KL and the GPTQ-compressed model's NLL, on any device."""
    requests = [Request(item=i, ids=row.tolist(), score_from=1) for i, row in enumerate(ids)]
    nll = [r.nll for r in score(model, requests)]
    modules = {"up": model.model.layers[0].mlp.up_proj}
    fast = fisher.fisher_scores(model, ids, modules, [SETTINGS["w3g64"]], robust=1e9).values["w3g64"]["up"]
    probed = probe(ProbeCache(model, ids), modules, {"up": 0}, SETTINGS["w3g64"])
    apply_plan_(model, load_plan("preset:w4g64"), ids)
    assert all(p.device == next(model.parameters()).device for p in model.parameters())
    return nll, fast, probed.kl, [r.nll for r in score(model, requests)]


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA GPU")
def test_every_path_runs_on_cuda_with_the_cpu_figures(model_dir, shrink_home):  # noqa: F811
    """fp32 on both: figures agree to float32 kernel differences (GPTQ's Cholesky and rounding ties aside)."""
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    on_cpu, on_cuda = load(f"{model_dir}#fp32@cpu"), load(f"{model_dir}#fp32@cuda")
    assert device_label(on_cuda.model).startswith("cuda:0 fp32 (")
    cpu, cuda = _figures(on_cpu.model, ids), _figures(on_cuda.model, ids)
    assert cuda[0] == pytest.approx(cpu[0], rel=1e-4)
    assert cuda[1] == pytest.approx(cpu[1], rel=1e-3)  # the same sampled labels: drawn on the CPU
    # a KL of 1e-5 is the mean of differences of nearly equal float32 log-probs: 0.4% apart on an H200
    assert cuda[2] == pytest.approx(cpu[2], rel=2e-2)
    assert cuda[3] == pytest.approx(cpu[3], rel=2e-2)
