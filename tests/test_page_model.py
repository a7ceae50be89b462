"""The Model page, run by Streamlit's AppTest against a real store."""
import pytest
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

from .jobwait import wait_job

PAGE = str(REPO_ROOT / "app_pages" / "model.py")


def page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60)


def test_bad_specs_give_one_sentence_and_the_page_keeps_working(shrink_home, tmp_path):
    Store().save_model({"spec": "builtin:smollm2-135m", "weights_hash": "h", "summary": _summary(), "modules": _modules(),
                        "load_seconds": 1.0, "from_cache": True})
    at = page().run()
    assert not at.exception
    for bad, words in [("/no/such/model", "does not exist"), ("builtin:llama-9000", "Unknown built-in model")]:
        at.text_input(key="model_spec_input").set_value(bad)
        at.button[0].click().run()
        assert not at.exception
        assert any(words in e.value for e in at.error), [e.value for e in at.error]
        assert any("134,515,008" in c.value for c in at.caption)  # the loaded model is still shown


def test_failed_load_shows_the_reason(shrink_home, tmp_path):
    (tmp_path / "empty").mkdir()
    at = page().run()
    at.text_input(key="model_spec_input").set_value(str(tmp_path / "empty"))
    at.button[0].click().run()
    job_id = at.session_state["job:model"]
    wait_job(shrink_home, job_id, expect="failed")
    at.run()
    assert any("no config.json" in e.value for e in at.error)


@pytest.mark.integration
def test_default_model_loads_in_background_and_shows_inventory(shrink_home):
    at = page().run()
    job_id = at.session_state["job:model"]  # opened on the default model with nothing stored: a load job starts
    assert job_id is not None
    wait_job(shrink_home, job_id)  # fails with the job's error and log tail unless it is done
    at.run()
    assert not at.exception
    assert any("134,515,008 parameters; 210 linear modules" in c.value for c in at.caption)
    table = at.dataframe[0].value
    assert len(table) == 273 and "model.layers.0.self_attn.q_proj" in set(table["name"])
    at.multiselect(key="inventory_kinds").set_value(["down"]).run()
    assert len(at.dataframe[0].value) == 30


def _summary():
    return {"architecture": "LlamaForCausalLM", "parameters": 134_515_008, "blocks": 30, "bytes_fp32": 538060032,
            "bytes_bf16": 269030016, "vocab_size": 49152, "context_length": 8192, "tied_modules": ["lm_head"],
            "block_linears": 210}


def _modules():
    return [{"name": "model.layers.0.self_attn.q_proj", "block": 0, "kind": "q", "shape": "576x576", "params": 331776,
             "bytes": 1327104, "dtype": "float32", "tied_to": None}]


def test_reference_names_its_source_quantization_and_the_size_cards_fit(shrink_home):
    Store().save_model({"spec": "builtin:smollm2-135m", "weights_hash": "h", "summary": _summary(), "modules": _modules(),
                        "load_seconds": 1.0, "from_cache": True})
    at = page().run()
    assert not at.exception
    cards = {m.label: m.value for m in at.metric}
    assert cards["Reference"] == "fp32 ← Q4_1"  # the built-in's GGUF is Q4_1 (general.file_type MOSTLY_Q4_1)
    assert any("Reference: fp32, dequantized from Q4_1" in c.value for c in at.caption)
    # one short value per card (a "538 / 269 MB" card was cut at 1400 px); 538,060,032 and 269,030,016 bytes
    assert cards["Size fp32"] == "538 MB" and cards["Size bf16"] == "269 MB"


def test_the_page_names_the_dtype_and_device_the_model_was_described_on(shrink_home):
    """The stored description keeps its device label, so a bf16 model on a GPU reads as such (and its jobs are
    admitted against that GPU's memory), not as the CPU in fp32."""
    from shrink_core.perf.footprint import facts_from_description

    spec = "builtin:smollm2-135m#bf16@cuda:1"
    device = "cuda:1 bf16 (NVIDIA H100 80GB HBM3, torch 2.13.0)"
    Store().save_model({"spec": spec, "weights_hash": "h+bf16", "summary": _summary(), "modules": _modules(),
                        "load_seconds": 1.0, "from_cache": True, "device": device})
    at = page()
    at.session_state["model_spec"] = spec
    at.run()
    assert not at.exception
    assert {m.label: m.value for m in at.metric}["Reference"] == "bf16 ← Q4_1"
    assert any(c.value.startswith(f"Runs on {device}: every figure") for c in at.caption)
    assert facts_from_description(Store().latest_model(spec)).device == "cuda:1"


def test_failed_hub_load_keeps_the_model_that_was_loaded(shrink_home):
    Store().save_model({"spec": "builtin:smollm2-135m", "weights_hash": "h", "summary": _summary(), "modules": _modules(),
                        "load_seconds": 1.0, "from_cache": True})
    at = page()
    at.session_state["model_spec"] = "builtin:smollm2-135m"  # the model in use
    at.run()
    at.text_input(key="model_spec_input").set_value("nosuch-org/nosuch-model")  # a Hub id; the Hub is offline
    at.button[0].click().run()
    assert jobs.wait(Store(), at.session_state["job:model"], timeout=120).status == "failed"
    at.run()
    assert not at.exception
    assert at.error  # the reason, in one sentence
    assert at.session_state["model_spec"] == "builtin:smollm2-135m"  # other pages keep using the loaded model
    assert any("134,515,008" in c.value for c in at.caption)  # and this page still shows it
