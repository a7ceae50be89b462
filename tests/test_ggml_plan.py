"""llama.cpp types as plan settings: parsing, exact bytes with llama.cpp's fallback, and the engine applying them so the
evaluated weights are exactly what the file stores."""
import gguf
import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.ggml.types import CODECS, GgmlState
from shrink_core.formats import GGML_TYPES, ggml_row_type, ggml_weight_bytes
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import PlanError, dump_plan, load_plan, resolve
from shrink_core.plan.menu import MENU, QUANT_SETTINGS, setting_name
from shrink_core.sensitivity.settings import perturbed


def plan(weights: dict, kind=("q", "k", "v", "o", "gate", "up", "down")) -> str:
    return dump_plan(load_plan({"version": 1, "rules": [{"kind": list(kind), "weights": weights}]}))


def test_plan_names_a_llama_cpp_type_and_round_trips():
    loaded = load_plan(plan({"ggml": "q4_k", "method": "imatrix"}))
    spec = loaded.rules[0].weights
    assert (spec.ggml, spec.method, spec.bits, spec.group_size) == ("Q4_K", "imatrix", 4, None)
    assert "ggml: Q4_K" in dump_plan(loaded) and "bits" not in dump_plan(loaded)
    assert load_plan(dump_plan(loaded)) == loaded
    assert loaded.needs_calibration  # the importance matrix comes from the plan's calibration mix


@pytest.mark.parametrize("weights, words", [
    ({"ggml": "Q4_Q"}, "not supported"),
    ({"ggml": "Q4_K", "bits": 4}, "sets the format by itself"),
    ({"ggml": "Q4_K", "method": "gptq"}, "use rtn .* or imatrix"),
    ({"bits": 4, "group_size": 64, "method": "imatrix"}, "applies to llama.cpp types only"),
])
def test_bad_llama_cpp_settings_say_what_to_do(weights, words):
    with pytest.raises(PlanError, match=words):
        load_plan({"version": 1, "rules": [{"kind": ["q"], "weights": weights}]})


def test_bytes_are_llama_cpp_blocks_after_its_fallback():
    # K-quants tile 256-wide rows; SmolLM2's 576-wide rows take the type llama.cpp falls back to
    assert ggml_row_type("Q4_K", 1536) == "Q4_K" and ggml_row_type("Q4_K", 576) == "Q5_0"
    assert ggml_row_type("Q6_K", 576) == "Q8_0" and ggml_row_type("IQ4_XS", 640) == "IQ4_NL"
    assert ggml_row_type("Q4_0", 100) == "F16"  # not even 32 tiles the row
    assert ggml_weight_bytes((576, 1536), "Q4_K") == 576 * 1536 // 256 * 144  # 4.5 bits per weight exactly
    assert ggml_weight_bytes((576, 576), "Q4_K") == 576 * 576 // 32 * 22  # as Q5_0: 5.5 bits per weight
    for name in GGML_TYPES:
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]
        assert ggml_weight_bytes((4, block * 8), name) == 4 * 8 * size


def test_resolve_counts_the_stored_type_and_says_so():
    model = tiny_llama(hidden=128)  # down reads 256 inputs (K-quant rows); the others 128 (fallback)
    rows = {r.name: r for r in resolve(model, load_plan(plan({"ggml": "Q4_K"})))}
    down, q = rows["model.layers.0.mlp.down_proj"], rows["model.layers.0.self_attn.q_proj"]
    assert down.packed_bytes == 128 * 256 // 256 * 144 and "stored as" not in down.note
    assert q.packed_bytes == 128 * 128 // 32 * 22 and "stored as Q5_0" in q.note
    assert down.row()["ggml"] == "Q4_K"


def test_menu_offers_llama_cpp_types_and_names_them_back():
    assert {"q4_k", "q6_k", "q8_0", "iq4_xs", "q3_k", "q2_k", "q5_k", "q5_0", "q4_0"} <= set(MENU)
    assert QUANT_SETTINGS["q4_k"]["ggml"] == "Q4_K"
    assert setting_name(4, None, False, ggml="Q4_K") == "q4_k"
    assert setting_name(4, None, False) != "q4_k"  # an int4 per-channel plan is not a llama.cpp type


def test_every_type_has_a_codec_with_gguf_geometry():
    for name in GGML_TYPES:
        codec = CODECS[name]
        assert (codec.block, codec.type_size) == gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name]]


def _file_values(state: GgmlState, shape) -> torch.Tensor:
    kind = gguf.GGMLQuantizationType[state.stored]
    return torch.from_numpy(gguf.quants.dequantize(state.data.numpy(), kind)).reshape(shape)


@pytest.mark.parametrize("ggml", ["Q4_K", "Q6_K", "IQ4_XS", "Q8_0"])
def test_apply_leaves_exactly_what_the_file_stores(ggml):
    model = tiny_llama(hidden=128)
    report = apply_plan_(model, plan({"ggml": ggml}))
    modules = dict(model.named_modules())
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj"):
        state = report.quant_states[name]
        weight = modules[name].weight.data
        assert isinstance(state, GgmlState) and state.stored == ggml_row_type(ggml, weight.shape[1])
        assert torch.equal(weight, _file_values(state, weight.shape))  # bit for bit, as gguf-py reads the file
    by_name = {m.name: m for m in report.modules}
    assert by_name["model.layers.1.mlp.down_proj"].packed_bytes == ggml_weight_bytes((128, 256), ggml)
    assert "(llama.cpp)" in by_name["model.layers.1.mlp.down_proj"].action


def test_imatrix_uses_calibration_and_weights_the_error():
    torch.manual_seed(0)
    calibration = torch.randint(0, 256, (4, 32))
    rtn, imatrix = tiny_llama(hidden=128), tiny_llama(hidden=128)
    apply_plan_(rtn, plan({"ggml": "Q4_K"}, kind=("down",)))
    report = apply_plan_(imatrix, plan({"ggml": "Q4_K", "method": "imatrix"}, kind=("down",)), calibration)
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(dict(rtn.named_modules())[name].weight, dict(imatrix.named_modules())[name].weight)
    assert "imatrix" in {m.name: m for m in report.modules}[name].action
    assert not report.notes or "fell back" not in " ".join(report.notes)


def test_scan_perturbs_with_the_same_blocks():
    weight = tiny_llama(hidden=128).model.layers[0].mlp.down_proj.weight.data
    out = perturbed(MENU["q4_k"], weight)
    assert out.shape == weight.shape and not torch.equal(out, weight)
    model = tiny_llama(hidden=128)
    apply_plan_(model, plan({"ggml": "Q4_K"}, kind=("down",)))
    assert torch.equal(out, model.model.layers[0].mlp.down_proj.weight.data)


def test_fallback_agrees_with_the_llama_quantize_reproduction():
    from shrink_core.compression.ggml.mixes import fallback_type

    for name in GGML_TYPES:
        for columns in (32, 64, 100, 256, 576, 640, 1536):
            assert ggml_row_type(name, columns) == fallback_type(name, columns), (name, columns)


def test_the_mixes_job_stores_one_named_candidate_per_mix(toy_dir, shrink_home):
    """The Plan page's "Evaluate llama.cpp mixes": one part per mix, each a candidate scored on the slices."""
    from shrink_core.results.store import Store
    from shrink_core.runtime import jobs

    store = Store()
    job_id = jobs.submit(store, "llama_mixes", "shrink_core.results.eval_run:standard_mixes_job",
                         {"spec": str(toy_dir), "slices": ["toy_en"], "budget": "fast",
                          "mixes": [["Q8_0", False], ["Q4_K_M", True]]}, spawn=False)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "done", job.error
    assert job.parts == ("llama.cpp Q8_0", "llama.cpp Q4_K_M imatrix") and job.parts_total == 2
    by_name = {c["name"]: c for c in store.candidates()}
    ids = {m["mix"]: m["candidate_id"] for m in job.result["mixes"]}
    assert set(ids) <= set(by_name) and {by_name[n]["id"] for n in ids} == set(ids.values())
    scored = {r["candidate_id"]: r for r in store.results("eval", job_id=job_id) if r["plan"]}
    assert set(scored) == set(ids.values())  # each mix measured on the slice, stored with the job
    weights = [r["weights"] for r in by_name["llama.cpp Q4_K_M imatrix"]["plan"]["rules"] if "weights" in r]
    assert weights and all(w["method"] == "imatrix" and w["ggml"] for w in weights)
