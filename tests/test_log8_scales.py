"""The log8 scale format (a plan's `scales: log8`): 8-bit log-grid scales under a per-row top and `bits`-bit zeros,
so 3-bit group 32 fits in the bytes of 3-bit group 64 with float16 scales. Every path stores exactly what it measured:
the quantizers, the end-to-end tuning and the packed artifact."""
import copy

import pytest
import torch

from shrink_core.compression.apply import apply_plan_
from shrink_core.compression.ct_export import write_compressed_tensors
from shrink_core.compression.export import packed_tensors, write_exports
from shrink_core.compression.primitives import (
    LOG_STEPS_PER_OCTAVE,
    dequantize,
    from_log_levels,
    log_levels,
    packed_weight_bytes,
    quantize,
    scale_zero,
    stored_scale,
    unpack,
)
from shrink_core.errors import ShrinkError
from shrink_core.model.inventory import ModuleInfo
from shrink_core.model.toy import tiny_llama
from shrink_core.plan import dump_plan, load_plan, resolve
from shrink_core.plan.spec import PlanError, WeightSpec

LINEARS = "[q, k, v, o, gate, up, down]"
CALIBRATION = torch.randint(0, 256, (12, 24), generator=torch.Generator().manual_seed(7))


def on_grid(scale: torch.Tensor) -> bool:
    level = torch.log2(scale) * LOG_STEPS_PER_OCTAVE
    return bool(((level - level.round()).abs() < 1e-3).all())


def plan_text(method: str = "gptq-seq", tune: str = "", bits: int = 3) -> str:
    return (f"version: 1\n{tune}rules:\n- {{kind: {LINEARS}, weights: {{bits: {bits}, group_size: 32, method: {method}, "
            "scales: log8}}\n")


def test_levels_round_within_half_a_step_keep_a_row_within_256_levels_and_decode_exactly():
    scale = torch.tensor([[1.0, 0.37, 0.0021, 1e-9], [3.0, 2.9, 2.8, 2.7]])
    top, offset = log_levels(scale)
    assert top.dtype == torch.int16 and offset.dtype == torch.uint8
    grid = from_log_levels(top, offset)
    assert on_grid(grid) and torch.equal(stored_scale(scale, "log8"), grid)
    off = torch.log2(grid / scale).abs() * LOG_STEPS_PER_OCTAVE  # in grid steps
    assert bool((off[:, :2] <= 0.5 + 1e-4).all()) and bool((off[1] <= 0.5 + 1e-4).all())
    assert offset[0, 2:].tolist() == [255, 255] and bool((grid[0, 2:] > scale[0, 2:]).all())  # raised to the floor
    assert torch.equal(stored_scale(grid, "log8"), grid)  # idempotent: re-encoding the stored values changes nothing
    assert torch.equal(stored_scale(scale), scale.half().float())


def test_scale_zero_keeps_the_same_ranges_on_the_grid_with_zeros_in_bits_bits():
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    fp16, _ = scale_zero(weight, 3, 32, False)
    log8, zero = scale_zero(weight, 3, 32, False, scales="log8")
    assert on_grid(log8) and not on_grid(fp16) and int(zero.max()) <= 7
    assert bool(((log8 / fp16).log2().abs() <= 0.5 / LOG_STEPS_PER_OCTAVE + 1e-3).all())


@pytest.mark.parametrize("shape", [(576, 576), (1536, 576), (576, 1536), (14336, 4096)])
def test_three_bit_group_32_fits_in_the_bytes_of_float16_group_64(shape):
    log8 = packed_weight_bytes(shape, 3, 32, False, "log8")
    assert log8["total"] <= packed_weight_bytes(shape, 3, 64, False)["total"]
    rows, columns = shape
    groups = columns // 32
    assert log8["scales"] == rows * (groups + 2) and log8["zeros"] == rows * -(-groups * 3 // 8)
    assert packed_weight_bytes(shape, 3, 32, True, "log8")["zeros"] == 0


def test_a_tuned_gptq_seq_plan_holds_stored_scales_and_the_artifact_decodes_to_the_model():
    reference = tiny_llama(seed=2).eval()
    model = copy.deepcopy(reference)
    plan = load_plan(plan_text(tune="tune: {kind: scales, steps: 5, lr: 0.01, holdout: 2}\n"))
    report = apply_plan_(model, plan, CALIBRATION, reference=reference)
    assert report.tuning["steps"] == 5 and len(report.quant_states) == 21
    tensors, layout = packed_tensors(model, report)
    for name, state in report.quant_states.items():
        assert state.scales == "log8" and on_grid(state.scale) and int(state.zero.max()) <= 7
        assert torch.equal(stored_scale(state.scale, "log8"), state.scale)  # exactly the stored values, tuned too
        weight = model.get_submodule(name).weight.detach()
        key = f"{name}.weight"
        assert layout[key]["scales"] == "log8" and f"{key}.scales" not in tensors
        groups = state.scale.shape[1]
        scale = from_log_levels(tensors[f"{key}.scale_top"], tensors[f"{key}.scale_offsets"])
        zero = unpack(tensors[f"{key}.zeros"], 3, groups).float()
        codes = unpack(tensors[f"{key}.codes"], 3, weight.shape[1])
        assert torch.equal(scale, state.scale) and torch.equal(zero, state.zero)
        assert torch.allclose(dequantize(codes, scale, zero, 32), weight, atol=1e-6)  # the model is what is stored
        stored = sum(tensors[f"{key}.{part}"].numel() * tensors[f"{key}.{part}"].element_size()
                     for part in ("codes", "scale_top", "scale_offsets", "zeros"))
        assert stored == packed_weight_bytes(tuple(weight.shape), 3, 32, False, "log8")["total"]


def test_the_plan_reads_writes_labels_and_refuses_log8():
    plan = load_plan(plan_text())
    assert plan.rules[0].weights.scales == "log8" and "scales: log8" in dump_plan(plan)
    assert load_plan(dump_plan(plan)) == plan
    assert "scales" not in dump_plan(load_plan(plan_text().replace(", scales: log8", "")))  # fp16 is implied
    assert WeightSpec(bits=3, group_size=32, scales="log8").label() == "int3 g32 log8 asym rtn"
    for weights, says in (({"bits": 3, "scales": "log4"}, "scales 'log4' is unknown"),
                          ({"ggml": "Q4_K", "scales": "log8"}, "a llama.cpp type stores its own scales"),
                          ({"bits": 16, "scales": "log8"}, "fp16 weights have no group scales"),
                          ({"bits": 3, "group_size": "channel", "scales": "log8"}, "scales log8 pays off with groups")):
        with pytest.raises(PlanError, match=says):
            load_plan({"version": 1, "rules": [{"kind": ["q"], "weights": weights}]})


def test_resolved_bytes_count_log8_and_the_exports_say_what_they_cannot_reproduce(tmp_path):
    model = tiny_llama(seed=1)
    resolved = resolve(model, load_plan(plan_text(method="rtn", bits=4)))
    row = next(r for r in resolved if r.name == "model.layers.0.mlp.down_proj")
    assert row.packed_bytes == packed_weight_bytes(row.shape, 4, 32, False, "log8")["total"]
    paths = write_exports(resolved, tmp_path / "recipes")
    assert "group scales on an 8-bit log grid" in paths["llm_compressor"].read_text()
    from tests.test_evaluate import byte_level_tokenizer

    report = apply_plan_(model, load_plan(plan_text(method="rtn", bits=4)), CALIBRATION)
    with pytest.raises(ShrinkError, match="stores its group scales as log8"):
        write_compressed_tensors(model, byte_level_tokenizer(), report, tmp_path / "ct", {})
    assert not (tmp_path / "ct").exists()


def test_the_menu_scans_plans_and_names_the_log8_settings():
    from shrink_core.plan.menu import MENU, setting_name
    from shrink_core.plan.planner import setting_action, setting_bytes, solution_plan
    from shrink_core.plan.predict import settings_by_module
    from shrink_core.sensitivity.settings import perturbed

    setting = MENU["w3g32-log8"]
    weight = tiny_llama(seed=1).get_submodule("model.layers.0.mlp.down_proj").weight.detach()
    scale, zero = scale_zero(weight, 3, 32, False, scales="log8")  # the scan perturbs as the engine stores
    assert torch.equal(perturbed(setting, weight), dequantize(quantize(weight, scale, zero, 3, 32), scale, zero, 32))
    assert setting_name(3, 32, False, scales="log8") == "w3g32-log8" and setting_name(3, 32, False) == "w3g32"
    assert setting_name(3, 64, False, scales="log8") == "w3g64-log8"  # q, k and o in w3-log8-rot-tuned-hq
    assert setting_name(4, 64, False, scales="log8") == "w4g64-log8"
    assert setting_name(3, 128, False, scales="log8") == "w3g128-log8"  # the cheapest 3-bit tier
    assert setting_name(5, 64, False, scales="log8") == "w5g64-log8"
    assert setting_name(5, 32, False, scales="log8") == "custom (5-bit, group 32, log8 scales)"
    assert setting_action("w3g32-log8", "gptq-seq")["weights"] == WeightSpec(3, 32, method="gptq-seq", scales="log8")
    from shrink_core.model.inventory import inventory

    info = [r for r in inventory(tiny_llama(seed=1)) if r.block is not None and r.kind in ("gate", "down")]
    names = [r.name for r in info]
    sizes = setting_bytes(info, names, ["w3g32-log8", "w3g32"])  # the planner counts the log8 format's bytes
    assert sizes[:, 0].tolist() == [packed_weight_bytes(r.shape, 3, 32, False, "log8")["total"] for r in info]
    assert (sizes[:, 0] < sizes[:, 1]).all()
    plan = solution_plan(dict.fromkeys(names, "w3g32-log8"), inventory(tiny_llama(seed=1)))
    assert set(settings_by_module(resolve(tiny_llama(seed=1), plan)).values()) >= {"w3g32-log8"}


def test_the_scan_keys_of_the_fp16_settings_did_not_change_with_scale_formats():
    from shrink_core.plan.menu import MENU

    assert "scales" not in MENU["w3g32"].key_fields() and MENU["w3g32-log8"].key_fields()["scales"] == "log8"
    assert MENU["w4g64"].key_fields() == {"id": "w4g64", "label": "int4 group 64 asymmetric (RTN)", "bits": 4,
                                          "group_size": 64, "symmetric": False, "prune": None, "ggml": None,
                                          "version": 2}


def test_the_clip_search_stores_each_rows_levels_under_its_chosen_top():
    """A row whose groups span more than 8 octaves: each clip ratio floors its levels under its own top, so the
    chosen mix must be stored again under the chosen scales' top, or the artifact would decode other scales."""
    from shrink_core.compression.obs import clip_search

    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(6, 128, generator=generator)
    weight[:, 96:] *= 1e-4  # the last group about 13 octaves below the first
    scale, zero = clip_search(weight, torch.rand(128, generator=generator) + 0.5, 3, 32, False, "log8")
    assert torch.equal(stored_scale(scale, "log8"), scale) and int(zero.max()) <= 7
    top, offset = log_levels(scale)
    assert torch.equal(from_log_levels(top, offset), scale) and int(offset.max()) == 255
    fp16 = clip_search(weight, torch.ones(128), 3, 32, False)[0]
    assert torch.equal(fp16, fp16.half().float())


def test_candidate_summaries_name_log8():
    from shrink_core.results.candidates import format_summary

    plan = {"rules": [{"kind": ["q"], "weights": {"bits": 3, "group_size": 32, "scales": "log8"}}]}
    assert format_summary(plan) == "int3 g32 log8 asym (engine packed; no compressed-tensors: it stores float scales)"
    plain = {"rules": [{"kind": ["q"], "weights": {"bits": 4, "group_size": 32}}]}
    assert format_summary(plain) == "int4 g32 asym (engine packed; compressed-tensors for int4/int8)"


def test_the_four_bit_log8_preset_fits_in_w4g64s_bytes_on_smollm2s_shapes():
    # SmolLM2-135M's block linears (out, in): group 32 alone overshoots 4.375 bits per weight on a 576-wide row (each
    # row's int16 top), so the preset keeps q and o at group 64; the whole must stay within w4g64's bytes
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
              "up": (1536, 576), "down": (576, 1536)}
    rules = load_plan("preset:w4-log8-rot").rules
    assert rules == load_plan("preset:w4-log8-rot-tuned").rules  # the tuned preset differs only by its `tune`

    def stored(kind, shape):
        spec = next(r.weights for r in rules if kind in r.kind)
        assert spec.bits == 4 and spec.scales == "log8"
        return packed_weight_bytes(shape, 4, spec.group_size, spec.symmetric, spec.scales)["total"]

    params = sum(rows * columns for rows, columns in shapes.values())
    preset_bits = 8 * sum(stored(kind, shape) for kind, shape in shapes.items()) / params
    w4g64_bits = 8 * sum(packed_weight_bytes(s, 4, 64, False)["total"] for s in shapes.values()) / params
    all_g32 = 8 * sum(packed_weight_bytes(s, 4, 32, False, "log8")["total"] for s in shapes.values()) / params
    assert w4g64_bits == 4.375 and all_g32 > w4g64_bits
    assert preset_bits == pytest.approx(4.3646, abs=1e-4) and preset_bits <= w4g64_bits


def test_the_three_bit_hq_preset_moves_bytes_to_the_early_down_proj_within_w3g64s_bytes_on_smollm2s_shapes():
    # SmolLM2-135M's 30 blocks (out, in): q, k and o at log8 group 64 pay for down_proj in blocks 0-3 at 4 bits; the
    # whole must stay within w3g64's 3.375 bits per weight, as measured (3.368), and the rest stay at group 32
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576),
              "up": (1536, 576), "down": (576, 1536)}
    rows = [ModuleInfo(f"model.layers.{b}.{kind}", b, kind, shape, shape[0] * shape[1], 4 * shape[0] * shape[1],
                       "float32") for b in range(30) for kind, shape in shapes.items()]
    resolved = resolve(rows, load_plan("preset:w3-log8-rot-tuned-hq"))
    formats = {(r.kind, r.block): (r.weights.bits, r.weights.group_size, r.weights.scales) for r in resolved}
    assert formats[("down", 3)] == (4, 32, "log8") and formats[("down", 4)] == (3, 32, "log8")
    assert {formats[(kind, 7)] for kind in ("q", "k", "o")} == {(3, 64, "log8")}
    assert {formats[(kind, 0)] for kind in ("v", "gate", "up")} == {(3, 32, "log8")}
    bits = 8 * sum(r.packed_bytes for r in resolved) / sum(r.shape[0] * r.shape[1] for r in resolved)
    assert bits == pytest.approx(3.3677, abs=1e-4) and bits <= 3.375
