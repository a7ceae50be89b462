"""The peer benchmark's arithmetic on tiny inputs: per-token KL and top-1, p99 and the CI, bits per weight, positions."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from bench_peers import (  # noqa: E402
    bits_per_weight,
    flat_positions,
    hqq_stored_bytes,
    main,
    markdown_table,
    methods,
    paired,
    render,
    row_label,
    skip_reason,
    slice_figures,
    token_kl,
)

from shrink_core.formats import ggml_weight_bytes, weight_bytes  # noqa: E402


def test_token_kl_is_zero_on_itself_and_matches_the_closed_form():
    ref = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]), dim=-1)
    other = torch.log_softmax(torch.tensor([[0.0, 2.0, -1.0], [1.0, 0.0, 0.0]]), dim=-1)
    kl, agree = token_kl(ref, ref)
    assert torch.allclose(kl, torch.zeros(2), atol=1e-7) and agree.all()
    kl, agree = token_kl(ref, other)
    expected = (ref.exp() * (ref - other)).sum(-1)
    assert torch.allclose(kl, expected) and (kl > 0).all()
    assert agree.tolist() == [False, True]  # token 0 vs 1 on the first; the uniform row's argmax is 0 on both


def test_slice_figures_mean_p99_top1_and_ci():
    kl = np.array([[0.0] * 98 + [1.0, 1.0], [0.0] * 100])  # two outlier tokens in 200: the p99 falls between
    agree = np.array([[True] * 50 + [False] * 50, [True] * 100])
    figures = slice_figures(kl, agree)
    assert figures["kl"] == pytest.approx(0.01) and figures["top1_agree"] == pytest.approx(0.75)
    assert figures["kl_p99"] == pytest.approx(0.01)  # position 197.01 of 200 sorted values: 0.01 of the way to 1
    low, high = figures["ci95"]
    assert 0 <= low <= figures["kl"] <= high <= 0.02  # the window means are 0.02 and 0
    assert (figures["windows"], figures["tokens"]) == (2, 200)
    assert figures["window_kl"] == pytest.approx([0.02, 0.0])  # kept for paired differences between rows


def test_bits_per_weight_count_scales_and_zeros():
    shape = (576, 1536)
    params = shape[0] * shape[1]
    assert bits_per_weight(weight_bytes(shape, 4, 64, False), params) == 4.375  # + fp16 scale and uint8 zero per 64
    assert bits_per_weight(weight_bytes(shape, 3, 64, False), params) == 3.375
    assert bits_per_weight(ggml_weight_bytes(shape, "Q4_K"), params) == 4.5
    assert bits_per_weight(ggml_weight_bytes((576, 576), "Q4_K"), 576 * 576) == 5.5  # stored as Q5_0


def test_hqq_bytes_are_the_packed_codes_and_float16_meta():
    codes = torch.zeros(64 * 16 // 2, dtype=torch.uint8)  # 4-bit: two codes per byte, (64 x 16) weights
    meta = torch.zeros(16)  # one scale and one zero per 64-wide group
    assert hqq_stored_bytes(codes, meta, meta) * 8 / (64 * 16) == 4.5


def test_positions_skip_each_windows_last_token():
    assert flat_positions(2, 4).tolist() == [0, 1, 2, 4, 5, 6]


def test_the_method_menu_names_every_method_once():
    menu = methods()
    assert {"rtn-w4g64", "gptq-w3g64", "q4_k", "q4_k-imatrix", "iq4_xs-imatrix", "hqq-w3g64",
            "llmcompressor-gptq-w4a16"} <= set(menu)
    assert all(m.family in ("plan", "hqq", "llmcompressor", "signround") for m in menu.values())
    tried = {n for n, m in menu.items() if not m.default}
    assert tried == {"awq-rtn-w4g64", "awq-rtn-w3g64", "awq-gptq-seq-w4g64", "awq-gptq-seq-w3g64",
                     "signround-w4g64", "signround-w3g64", "gptq-seq-signround-w4g64", "gptq-seq-signround-w3g64",
                     *(f"{r}-{m}-w{b}g64" for r in ("rot", "had") for m in ("rtn", "gptq", "gptq-seq") for b in (4, 3)),
                     *(f"{r}lut-gptq-seq-w{b}" for r in ("", "had-") for b in (3, 2)),
                     *(f"e2e-{r}gptq-seq-w{b}g64" for r in ("", "had-") for b in (4, 3)),
                     *(f"{e}had-gptq-seq-w3g{g}" for e in ("", "e2e-") for g in (32, 128)),
                     *(f"{e}had-gptq-seq-w3g{g}-s8" for e in ("", "e2e-") for g in (32, 64))}
    assert menu["e2e-had-gptq-seq-w3g64"].rotate == "hadamard" and menu["e2e-had-gptq-seq-w3g64"].e2e
    compact = menu["e2e-had-gptq-seq-w3g32-s8"]
    assert compact.weights["scales"] == "log8" and compact.e2e and compact.weights["group_size"] == 32


def test_markdown_table_marks_slices_outside_the_mix_and_names_both_worst_slices():
    rows = [{"method": "a", "bits_per_weight": 4.375, "quantize_seconds": 161.2,
             "kl": {"en": 0.07, "fr": 0.12, "hi": 0.19}},
            {"method": "b", "bits_per_weight": 5.5, "quantize_seconds": 8.0, "kl": {"en": 0.3, "fr": 0.1, "hi": 0.2}}]
    lines = markdown_table(rows, {"en": True, "fr": True, "hi": False}).splitlines()
    assert lines[0] == "| method | bits/weight | quantize s | en | fr | hi* | worst calibrated | worst |"
    assert lines[2] == "| a | 4.375 | 161 | 0.070 | 0.120 | 0.190 | 0.120 (fr) | 0.190 (hi) |"
    assert lines[3] == "| b | 5.500 | 8 | 0.300 | 0.100 | 0.200 | 0.300 (en) | 0.300 (en) |"


def test_a_run_at_another_calibration_renders_as_its_own_row(tmp_path):
    from shrink_core.plan.presets import QUANT_RECIPE

    def run(name: str, recipe: dict, kl: float) -> Path:
        lines = [{"part": "setup", "calibration": recipe}]
        lines += [{"part": "slice", "method": method, "slice": "en", "calibrated": True, "kl": kl,
                   "bits_per_weight": 4.375, "quantize_seconds": 1.0} for method in ("gptq-seq-w4g64", "q5_0")]
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(line) for line in lines))
        return path

    more = {**QUANT_RECIPE, "n_sequences": 128}
    english = {**QUANT_RECIPE, "mix": {"en": 1.0}}
    assert row_label("gptq-seq-w4g64", QUANT_RECIPE) == "gptq-seq-w4g64"
    assert row_label("q5_0", more) == "q5_0"  # not calibrated: the recipe does not touch it
    assert row_label("gptq-seq-w4g64", english) == "gptq-seq-w4g64 (64x512, en=1.0)"
    # the statistics: a run stored before `shrink` (version 1) computed raw ones; another share says which
    raw = {k: v for k, v in QUANT_RECIPE.items() if k != "shrink"} | {"version": 1}
    assert row_label("gptq-seq-w4g64", raw) == "gptq-seq-w4g64 (64x512, raw statistics)"
    assert row_label("gptq-seq-w4g64", {**QUANT_RECIPE, "shrink": 0.5}) == "gptq-seq-w4g64 (64x512, shrink 0.5)"
    assert row_label("q3_k-imatrix", raw) == row_label("q3_k-imatrix", QUANT_RECIPE) == "q3_k-imatrix"
    assert row_label("q3_k-imatrix", english) == "q3_k-imatrix (64x512, en=1.0)"
    table = render(run("a.jsonl", QUANT_RECIPE, 0.076), run("b.jsonl", more, 0.069)).splitlines()
    assert [line.split(" | ")[0] for line in table[2:]] == [
        "| gptq-seq-w4g64", "| q5_0", "| gptq-seq-w4g64 (128x512)"]
    assert "| 0.076 |" in table[2] and "| 0.069 |" in table[4]
    rerun = render(run("a.jsonl", QUANT_RECIPE, 0.076), run("c.jsonl", QUANT_RECIPE, 0.074)).splitlines()
    assert len(rerun) == 4 and "| 0.074 |" in rerun[2]  # the later run of the same method and recipe


def test_paired_differences_are_per_window_and_name_a_missing_row(tmp_path):
    """Two rows on the same windows: the difference is taken window by window, so a shift shared by every window has
    a CI of one point, which the rows' separate CIs would not show."""
    base = np.array([0.2, 0.5, 0.3, 0.9])
    lines = [{"part": "slice", "method": "a", "slice": "en", "window_kl": base.tolist()},
             {"part": "slice", "method": "plan:p.yaml", "slice": "en", "window_kl": (base - 0.1).tolist()},
             {"part": "slice", "method": "a", "slice": "hi", "window_kl": [1.0, 1.0]}]
    path = tmp_path / "peers.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines))
    out = paired([path], "a", "plan:p.yaml")
    assert list(out) == ["en"]  # hi has no second row
    assert out["en"]["difference"] == pytest.approx(-0.1)
    assert out["en"]["ci95"] == pytest.approx([-0.1, -0.1])
    assert out["en"]["ratio"] == pytest.approx(0.375 / 0.475, abs=1e-4)
    with pytest.raises(SystemExit, match="no per-window KL for b"):
        paired([path], "a", "b")
    other = tmp_path / "other.jsonl"  # a second run's row on other windows is refused, not paired
    other.write_text(json.dumps({"part": "slice", "method": "b", "slice": "en", "window_kl": [0.1, 0.2]}))
    with pytest.raises(SystemExit, match="different windows of en"):
        paired([path, other], "a", "b")
    # the same method from two runs, by file; a run of 4 windows pairs with one of 2 over the 2 windows both read
    run = lambda kl: {"part": "slice", "method": "a", "slice": "en", "window_kl": kl, "windows": len(kl),
                      "tokens": 511 * len(kl)}
    longer, shorter = tmp_path / "long.jsonl", tmp_path / "short.jsonl"
    longer.write_text(json.dumps(run([0.5, 0.7, 0.1, 0.1])))
    shorter.write_text(json.dumps(run([0.6, 0.6])))
    out = paired([], f"a@{shorter}", f"a@{longer}")
    assert out["en"]["windows"] == 2 and out["en"]["difference"] == pytest.approx(0.0)
    assert out["en"]["ratio"] == pytest.approx(1.0)


def test_off_the_cpu_only_the_engines_own_plans_run():
    menu = methods()
    assert skip_reason(menu["e2e-had-gptq-seq-w3g32-s8"], "cuda") is None
    assert skip_reason(menu["gptq-seq-w4g64"], "cuda") is None
    assert skip_reason(menu["q4_k"], "cuda") is None  # llama.cpp's types are the engine's plans too
    for name in ("hqq-w3g64", "awq-rtn-w4g64", "rot-gptq-w3g64", "lut-gptq-seq-w3", "signround-w4g64",
                 "gptq-seq-signround-w4g64"):
        assert "only the engine's own plans run" in (skip_reason(menu[name], "cuda") or ""), name
    assert skip_reason(menu["awq-rtn-w4g64"]) is None  # on the CPU the bench-only patches run


def test_an_unknown_preset_is_refused_in_one_sentence_before_any_model_loads(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_peers.py", "--preset", "w4g64,w5g7"])
    with pytest.raises(SystemExit, match=r"--preset w5g7: no such preset; choose from .*w3-log8-rot-tuned-hq"):
        main()


def test_the_whole_table_names_only_known_methods_and_presets():
    from bench_peers import TABLE_METHODS, TABLE_PRESETS

    from shrink_core.plan.presets import preset_names

    menu = methods()
    assert all(name in menu for name in TABLE_METHODS.split(","))
    assert {"q3_k", "q3_k-imatrix", "iq4_xs", "hqq-w3g64", "rtn-w3g64"} <= set(TABLE_METHODS.split(","))
    whole = {name for name in preset_names() if name.startswith("w") and name != "w4g64-keep-ends"}
    assert set(TABLE_PRESETS.split(",")) == whole  # every preset that quantizes every block linear
