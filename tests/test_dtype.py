"""The dtype a model runs in: a `#bf16` spec suffix (or --dtype / the Model page), kept apart in the store, with
statistics in float32 whatever the model's dtype."""
import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.errors import ModelLoadError
from shrink_core.model.describe import device_label
from shrink_core.model.load import ModelSpec, load, with_dtype
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import load_plan
from shrink_core.sensitivity.settings import SETTINGS, perturbed

from .fisher_oracle import kept_statistics
from .test_export import tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def test_the_spec_suffix_loads_that_dtype_and_names_it(model_dir, shrink_home):
    fp32, bf16 = load(str(model_dir)), load(f"{model_dir}#bf16")
    assert next(fp32.model.parameters()).dtype == torch.float32
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    assert bf16.weights_hash == fp32.weights_hash + "+bf16"  # other figures: never served from the fp32 ones
    assert device_label(bf16.model).startswith("cpu bf16 (") and device_label(fp32.model).startswith("cpu fp32 (")
    assert with_dtype(str(model_dir), "fp16") == f"{model_dir}#fp16" == with_dtype(f"{model_dir}#bf16", "fp16")
    assert with_dtype("builtin:smollm2-135m", "auto") == "builtin:smollm2-135m"
    with pytest.raises(ModelLoadError, match=r"^Unknown dtype 'int8' after '#' in the model spec; use #bf16"):
        ModelSpec.parse(f"{model_dir}#int8")


def test_a_bf16_model_compresses_with_float32_statistics(model_dir, shrink_home):
    model = load(f"{model_dir}#bf16").model
    weight = model.model.layers[0].mlp.up_proj.weight.detach()
    assert perturbed(SETTINGS["w4g64"], weight).dtype == torch.bfloat16
    # the bf16 weight's error is the float32 quantizer's, rounded once to bf16
    expected = perturbed(SETTINGS["w4g64"], weight.float()).to(torch.bfloat16)
    assert torch.equal(perturbed(SETTINGS["w4g64"], weight), expected)
    ids = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
    modules = {"up": model.model.layers[0].mlp.up_proj}
    stats = kept_statistics(model, ids, modules, first_order=True)
    assert stats.fisher["up"].dtype == stats.gradient["up"].dtype == torch.float32 and stats.fisher["up"].sum() > 0
    report = apply_plan_(model, load_plan("preset:w4g64"), ids)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert {m.action for m in report.modules if m.block is not None} == {"int4 g64 asym gptq-seq"}
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits.float()).all()


def test_the_cli_flag_becomes_the_spec_suffix(model_dir, shrink_home, capsys):
    import json

    from shrink_core.cli.entry import main

    assert main(["inspect", "--model", str(model_dir), "--dtype", "bf16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["spec"] == f"{model_dir}#bf16" and report["device"].startswith("cpu bf16")
    assert report["summary"]["dtype"] == "bfloat16"


def test_a_gguf_converts_to_the_dtype_asked_for_and_keeps_its_first_copy(shrink_home, monkeypatch):
    """A GGUF asked for in bf16 on a machine with no copy of it is dequantized straight to bf16 (no fp32 model in
    memory); the same values as the fp32 copy cast, and the bf16 copy stays the one bf16 loads read (its hash)."""
    from safetensors import safe_open

    monkeypatch.setenv("SHRINK_MODEL_CACHE", str(shrink_home / "models"))  # not the copies other tests share
    bf16 = load("builtin:smollm2-135m#bf16")
    assert bf16.notes[0].startswith("GGUF weights dequantized to bf16, tensor by tensor")
    files = list(bf16.source_dir.glob("*.safetensors"))
    with safe_open(str(files[0]), "pt") as handle:
        assert handle.get_slice(next(iter(handle.keys()))).get_dtype() == "BF16"
    fp32 = load("builtin:smollm2-135m")  # makes the fp32 copy beside it
    again = load("builtin:smollm2-135m#bf16")
    assert again.weights_hash == bf16.weights_hash != fp32.weights_hash + "+bf16" and again.from_cache
    cast = {name: tensor.to(torch.bfloat16) for name, tensor in fp32.model.state_dict().items()}
    assert all(torch.equal(tensor, cast[name]) for name, tensor in again.model.state_dict().items())
