"""Model specs and loading: every bad input a new user tries gives one clear sentence."""
import json

import pytest
import torch

from shrink_core.errors import ModelLoadError
from shrink_core.model.load import ModelSpec, check_safetensors, load


def one_sentence(exc: Exception) -> str:
    text = str(exc)
    assert "\n" not in text and "Traceback" not in text
    assert text.endswith("."), text
    return text


def test_spec_kinds(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert ModelSpec.parse("builtin:smollm2-135m").kind == "builtin"
    assert ModelSpec.parse(str(tmp_path)).kind == "local"
    assert ModelSpec.parse(str(tmp_path / "m.gguf")).kind == "gguf"
    assert ModelSpec.parse("HuggingFaceTB/SmolLM2-135M").kind == "hub"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("", "empty"),
        ("builtin:nope", "Unknown built-in model 'nope'"),
        ("/does/not/exist", "does not exist"),
        ("./relative/missing", "does not exist"),
    ],
)
def test_bad_specs(spec, words):
    with pytest.raises(ModelLoadError) as info:
        ModelSpec.parse(spec)
    assert words in one_sentence(info.value)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        ModelSpec.parse(str(path))


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load(str(tmp_path))
    assert "no config.json" in one_sentence(info.value)


def test_pickle_only_checkpoint_is_refused_then_allowed(tmp_path, tiny_model, shrink_home):
    tiny_model.config.save_pretrained(tmp_path)
    torch.save(tiny_model.state_dict(), tmp_path / "pytorch_model.bin")  # the legacy pickle format
    with pytest.raises(ModelLoadError) as info:
        load(str(tmp_path))
    assert "pickle" in one_sentence(info.value) and "--allow-pickle" in str(info.value)
    loaded = load(str(tmp_path), allow_pickle=True)
    assert sum(p.numel() for p in loaded.model.parameters()) == sum(p.numel() for p in tiny_model.parameters())


def test_truncated_safetensors(tmp_path, tiny_model, shrink_home):
    tiny_model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    check_safetensors(weights)  # intact file passes
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError) as info:
        load(str(tmp_path))
    assert "truncated" in one_sentence(info.value)
    weights.write_bytes(data[:4])
    with pytest.raises(ModelLoadError, match="damaged or truncated"):
        check_safetensors(weights)


def test_local_directory_round_trip(tmp_path, tiny_model, shrink_home):
    tiny_model.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, tiny_model(ids).logits)
    assert loaded.tokenizer is None and any("No tokenizer" in note for note in loaded.notes)
    assert len(loaded.weights_hash) == 64
    assert load(str(tmp_path)).weights_hash == loaded.weights_hash  # memoised, stable


def test_remote_code_needs_consent(tmp_path, tiny_model, shrink_home):
    tiny_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError) as info:
        load(str(tmp_path))
    assert "--trust-remote-code" in one_sentence(info.value)


def test_hub_id_offline(monkeypatch, shrink_home):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load("someorg/some-model-that-is-not-cached")
    text = one_sentence(info.value)
    assert "cannot reach" in text and "--model DIR" in text
