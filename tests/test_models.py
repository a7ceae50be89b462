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


def test_a_sharded_checkpoint_loads_whole_and_its_hash_covers_every_shard(tmp_path, tiny_model, shrink_home):
    """Real 8B checkpoints come as several safetensors shards and an index: the same model as one file, and a
    change in any shard is another model to the store."""
    tiny_model.save_pretrained(tmp_path / "one")
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    shards = sorted((tmp_path / "sharded").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, sharded = load(str(tmp_path / "one")), load(str(tmp_path / "sharded"))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(sharded.model(ids).logits, one.model(ids).logits)
    before = sharded.weights_hash
    last = shards[-1]
    from safetensors.torch import load_file, save_file

    tensors = load_file(last)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, last, metadata={"format": "pt"})
    assert load(str(tmp_path / "sharded")).weights_hash != before


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


CHILD = """
import os, sys, time
from pathlib import Path
from shrink_core.model.load import build_cache_dir

target, log, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
while not go.exists():  # both processes ask at the same moment
    time.sleep(0.01)

def build(tmp):
    with open(log, "a") as handle:
        handle.write(f"{os.getpid()}\\n")
    (tmp / "model.safetensors").write_bytes(b"w" * 4096)
    time.sleep(1.0)  # a slow conversion: the other process arrives while this one writes
    (tmp / "config.json").write_text("{}")
    return {"format": 1}

print(build_cache_dir(target, build))
"""


def test_two_processes_converting_at_once_build_the_cache_once(tmp_path):
    """Two loads of the same GGUF at the same time: one converts, the other waits and reuses its cache."""
    import subprocess
    import sys

    from shrink_core.paths import REPO_ROOT

    target, log, go = tmp_path / "model-abc", tmp_path / "builds.log", tmp_path / "go"
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(target), str(log), str(go)], cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    go.touch()
    results = [child.communicate(timeout=60) for child in children]
    assert [child.returncode for child in children] == [0, 0], [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["False", "True"]  # one built, one found it built
    assert len(log.read_text().splitlines()) == 1
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "shrink-cache.json"]
    assert (target / "model.safetensors").stat().st_size == 4096
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "go", "model-abc", "model-abc.lock"]


def test_a_failed_conversion_leaves_no_cache(tmp_path):
    from shrink_core.model.load import build_cache_dir

    target = tmp_path / "model-abc"
    (tmp_path / "model-abc.partial-old").mkdir()  # left by a conversion that crashed

    def broken(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise ModelLoadError("The GGUF file x.gguf could not be read: bad tensor.")

    with pytest.raises(ModelLoadError):
        build_cache_dir(target, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model-abc.lock"]
    assert build_cache_dir(target, lambda tmp: (tmp / "config.json").write_text("{}") and {"format": 1}) is False
    assert build_cache_dir(target, broken) is True  # complete now: never rebuilt


def test_one_gguf_parse_shares_a_reader_that_reads_the_same_fields_and_tensors(tmp_path):
    """The conversion parses the GGUF header once over a plain array; what it reads must equal gguf's own reader."""
    import gguf
    import numpy as np

    from shrink_core.model.load import _one_gguf_parse

    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    writer.add_uint32("llama.block_count", 2)
    writer.add_tensor("w", np.arange(64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    reference = gguf.GGUFReader(str(path))
    with _one_gguf_parse():
        first, second = gguf.GGUFReader(str(path)), gguf.GGUFReader(path)
        assert first is second
        assert type(first.data) is np.ndarray  # not a memmap: the point of the plain reader
        assert list(first.fields) == list(reference.fields)
        assert first.fields["tokenizer.ggml.tokens"].contents() == [f"tok{i}" for i in range(300)]
        assert [t.name for t in first.tensors] == ["w"]
        assert np.array_equal(first.tensors[0].data, reference.tensors[0].data)
    assert gguf.GGUFReader is type(reference)  # restored afterwards
