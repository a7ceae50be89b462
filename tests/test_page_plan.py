"""The Plan page with AppTest, on the tiny model's inventory in a real store (no model load needed)."""
import pytest
from streamlit.testing.v1 import AppTest

from shrink_core.model.inventory import inventory
from shrink_core.model.toy import tiny_llama
from shrink_core.paths import REPO_ROOT
from shrink_core.plan import load_plan, resolve, totals
from shrink_core.plan.presets import PRESETS
from shrink_core.results.store import Provenance, Store

PAGE = str(REPO_ROOT / "app_pages" / "plan.py")
SPEC = "builtin:smollm2-135m"  # the page's default spec; the stored inventory is the tiny model's


@pytest.fixture
def stored_tiny(shrink_home):
    from shrink_core.model.inventory import summary

    model = tiny_llama(hidden=128)  # group 128 must divide the input features, as on real models
    rows = inventory(model)
    Store().save_model({"spec": SPEC, "weights_hash": "tiny", "summary": summary(model, rows),
                        "modules": [r.row() for r in rows], "load_seconds": 0.1, "from_cache": False})
    return rows


def page():
    return AppTest.from_file(PAGE, default_timeout=60)


def metric(at, label):
    return next(m.value for m in at.metric if m.label.startswith(label))


def test_preset_bulk_edit_undo_and_refusal(stored_tiny):
    at = page().run()
    assert not at.exception
    w4_size = metric(at, "Packed size")
    at.selectbox(key="plan_preset").set_value("w8").run()
    assert PRESETS["w8"]["description"] in [c.value for c in at.caption]  # shown before it replaces the draft
    at.button(key="use_preset").click().run()
    assert "bits: 8" in at.session_state["plan_draft"]
    assert metric(at, "Packed size") != w4_size
    assert float(metric(at, "Bits per weight")) > 0
    # bulk: keep blocks 0-1 of q and k
    at.multiselect(key="bulk_kinds").set_value(["q", "k"]).run()
    at.slider(key="bulk_blocks").set_value((0, 1))
    at.selectbox(key="bulk_setting").set_value("keep").run()  # Apply is enabled once a setting is chosen
    at.button(key="bulk_apply").click().run()
    assert not at.exception
    draft = at.session_state["plan_draft"]
    assert draft.index("keep: true") < draft.index("bits: 8") and "blocks: [0, 1]" in draft
    at.button(key="plan_undo").click().run()
    assert "keep: true" not in at.session_state["plan_draft"]
    # a bulk edit over every linear and every block shadows the preset's rule: the rule is dropped, the page lives on
    at.multiselect(key="bulk_kinds").set_value(["q", "k", "v", "o", "gate", "up", "down"]).run()
    slider = at.slider(key="bulk_blocks")
    slider.set_value((slider.min, slider.max))
    at.selectbox(key="bulk_setting").set_value("w8").run()
    at.button(key="bulk_apply").click().run()
    assert not at.exception and not at.error
    assert at.session_state["plan_draft"].count("bits:") == 1 and "bits: 8" in at.session_state["plan_draft"]
    at.button(key="plan_undo").click().run()
    # an invalid YAML edit is refused inline, and the draft is unchanged
    before = at.session_state["plan_draft"]
    at.text_area[0].set_value("version: 1\nrules:\n- kind: [q]\n  weights: {bits: 7}\n").run()
    assert any("bits 7 is not supported" in e.value for e in at.error)
    assert at.session_state["plan_draft"] == before


def store_scores(rows, settings=("w4g64", "w3g64"), scales=None, slices=("en", "zh")):
    store = Store()
    linears = [r for r in rows if r.block is not None and r.kind in ("q", "k", "v", "o", "gate", "up", "down")]
    from shrink_core import __version__
    from shrink_core.sensitivity.probe import SCAN_DEPTHS
    from shrink_core.sensitivity.scan import scores_key
    from shrink_core.sensitivity.settings import get_setting

    for slice_id in slices:  # stored as the sensitivity scan stores its scores, under its figure key
        for setting in settings:
            scale = (scales or {"w3g64": 4, "w2g64": 16}).get(setting, 1)
            values = {r.name: [(0.5 if r.block == 0 else 0.01) * scale(r.block) if callable(scale) else
                               (0.5 if r.block == 0 else 0.01) * scale] * 2 for r in linears}
            key = scores_key("tiny", slice_id, get_setting(setting), "fast", SCAN_DEPTHS["fast"])
            store.add_result("sensitivity", Provenance(SPEC, "tiny", __version__, "cpu", slice=slice_id, budget="fast"),
                             {"type": "scores", "method": "fast", "setting": setting, "values": values,
                              "figure_key": key})


def test_planner_with_stored_scores(stored_tiny):
    store_scores(stored_tiny)
    at = page().run()
    assert not at.exception
    assert any(m.label.startswith("Predicted worst slice") for m in at.metric)
    predicted = next(d.value for d in at.dataframe if "scored" in d.value.columns)
    # the default w4g64 plan changes every block linear, all scored: the prediction is their sum, not an empty one
    assert (predicted["scored"] > 0).all() and (predicted["value"] > 0).all()
    at.radio(key="planner_budget_kind").set_value("bits/weight").run()
    at.number_input(key="planner_budget_bits/weight").set_value(20.0)
    at.button(key="run_planner").click().run()
    assert not at.exception, at.exception
    result = at.session_state["planner_result"]
    assert result["status"] == "optimal"
    draft = at.session_state["plan_draft"]
    assert "planner: " in draft
    assert not at.error and any(m.label == "Packed size" for m in at.metric)  # the old preset rule was dropped


def test_the_2bit_cap_per_block_bounds_the_planners_draft(stored_tiny):
    store_scores(stored_tiny, ("w4g64", "w3g64", "w2g64"))
    at = page().run()
    at.radio(key="planner_budget_kind").set_value("bits/weight").run()
    at.number_input(key="planner_budget_bits/weight").set_value(2.9)

    def two_bit_per_block():
        resolved = resolve(stored_tiny, load_plan(at.session_state["plan_draft"]))
        counts = {}
        for r in resolved:
            if r.block is not None and r.bits == 2:
                counts[r.block] = counts.get(r.block, 0) + 1
        return counts

    at.button(key="run_planner").click().run()
    assert not at.exception and max(two_bit_per_block().values()) > 1  # the cheap blocks take 2 bits wholesale
    at.selectbox(key="planner_low_per_block").set_value(1).run()
    at.number_input(key="planner_budget_bits/weight").set_value(3.4)
    at.button(key="run_planner").click().run()
    assert not at.exception and not at.error and at.session_state["planner_result"]["status"] == "optimal"
    assert two_bit_per_block() and max(two_bit_per_block().values()) == 1


def test_pruning_is_on_the_planners_menu_only_where_the_user_adds_it(stored_tiny):
    """A 2:4 + w4g64 setting (w3g64's bytes, stored sparse) is scanned but not selected by default: the plan at 3.375
    bits prunes nothing. Added to the settings, the planner prunes the block where the mask costs less than a bit,
    and the page's size counts those modules at their sparse format's bytes."""
    # block 0: the mask (x2) hurts less than w3g64 (x4); elsewhere it hurts more (x10 against x4)
    store_scores(stored_tiny, ("w4g64", "w3g64", "w4g64+nm24"),
                 scales={"w3g64": 4, "w4g64+nm24": lambda block: 2 if block == 0 else 10})
    at = page().run()
    assert not at.exception
    assert at.multiselect(key="planner_settings").value == ["w3g64", "w4g64"]
    assert "w4g64+nm24" in at.multiselect(key="planner_settings").options
    at.radio(key="planner_budget_kind").set_value("bits/weight").run()
    at.number_input(key="planner_budget_bits/weight").set_value(3.375)
    at.button(key="run_planner").click().run()
    assert not at.exception and not at.error
    assert "prune" not in at.session_state["plan_draft"]
    at.multiselect(key="planner_settings").set_value(["w3g64", "w4g64", "w4g64+nm24"]).run()
    at.button(key="run_planner").click().run()
    assert not at.exception and not at.error and at.session_state["planner_result"]["status"] == "optimal"
    resolved = resolve(stored_tiny, load_plan(at.session_state["plan_draft"]))
    pruned = {r.block for r in resolved if r.prune is not None}
    assert pruned == {0} and all(r.bits == 4 for r in resolved if r.prune is not None)
    assert "planner: w4g64+nm24" in at.session_state["plan_draft"]
    # the planner's whole-model bytes are the page's size: the pruned modules at their sparse format's
    assert at.session_state["planner_result"]["bytes"] == totals(resolved, stored_tiny)["total_packed_sparse_bytes"]
    assert totals(resolved, stored_tiny)["total_packed_sparse_bytes"] < totals(resolved, stored_tiny)["total_packed_bytes"]
    assert any("pruned modules at their sparse format" in c.value for c in at.caption)


def test_planner_under_a_projected_latency_budget(stored_tiny):
    store_scores(stored_tiny)
    at = page().run()
    at.selectbox(key="plan_target").set_value("raspberry-pi-5").run()  # int4 kernels there: w4g64 is faster
    current = float(metric(at, "Projected decode").split()[0])
    assert any("projected, not measured" in c.value for c in at.caption)
    at.radio(key="planner_budget_kind").set_value("ms/token").run()
    assert any("latency budget is projected, not measured" in c.value for c in at.caption)
    at.number_input(key="planner_budget_ms/token").set_value(round(current * 1.02, 4))  # the w4g64 draft + 2%
    at.button(key="run_planner").click().run()
    assert not at.exception, at.exception
    result = at.session_state["planner_result"]
    assert result["status"] == "optimal" and result["target"] == "raspberry-pi-5"
    assert result["projected_ms"] <= current * 1.02 + 1e-4
    assert float(metric(at, "Projected decode").split()[0]) == pytest.approx(result["projected_ms"],
                                                                                               abs=2e-3)
    assert any("roofline, not measured" in s.value for s in at.success)


def test_predicted_worst_slice_names_its_metric_and_unit(stored_tiny):
    store_scores(stored_tiny)
    at = page().run()
    card = next(m for m in at.metric if m.label.startswith("Predicted worst slice"))
    assert "nats/token" in card.label and card.value.endswith(" KL"), (card.label, card.value)
    at.radio(key="predict_metric").set_value("dnll").run()
    card = next(m for m in at.metric if m.label.startswith("Predicted worst slice"))
    assert card.value.endswith(" ΔNLL"), card.value


def store_measured(kls: dict[str, float]) -> None:
    """Measured gptq-seq plans of the tiny model (KL on en, and 1.2x that on zh)."""
    store = Store()
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]

    def rule(bits, blocks=None):
        return {"kind": kinds, **({"blocks": blocks} if blocks is not None else {}),
                "weights": {"bits": bits, "group_size": 64, "symmetric": False, "method": "gptq-seq"}}

    rules = {"w4": [rule(4)], "w3": [rule(3)], "mixed": [rule(3, [0]), rule(4)], "w3 front": [rule(3, [1]), rule(4)]}
    measured = {name: (rules[name], kl) for name, kl in kls.items()}
    for name, (rules, kl) in measured.items():
        plan = {"version": 1, "name": name, "rules": rules}
        cid = store.upsert_candidate(name=name, kind="quantized", model_spec=SPEC, weights_hash="tiny",
                                     code_version="t", plan=plan)
        for slice_id, factor in (("en", 1.0), ("zh", 1.2)):
            store.add_result("eval", Provenance(SPEC, "tiny", "t", "cpu", plan=plan, slice=slice_id, budget="fast"),
                             {"kl": kl * factor, "nll": 3.0}, candidate_id=cid)


def test_fitted_prediction_with_its_interval_and_the_newest_plans_error(stored_tiny):
    """Measured plans of the draft's method correct the additive sum: the page shows the fit, its interval, the newest
    plan's error, and the planner can plan with it."""
    store_scores(stored_tiny)
    store_measured({"w4": 0.3, "w3": 1.9, "mixed": 1.1, "w3 front": 0.5})
    at = page().run()
    assert not at.exception, at.exception
    card = next(m for m in at.metric if m.label.startswith("Fitted worst slice"))
    assert card.value.startswith("+") and card.value.endswith(" KL") and "95% interval" in card.help
    error = next(m for m in at.metric if m.label.startswith("Newest measured plan"))
    assert "w3 front" in error.help and "3 plan(s) measured before it" in error.help
    assert any("fitted on 4 measured gptq-seq plans" in c.value for c in at.caption)
    assert not at.checkbox(key="planner_use_fit_rtn_False").value  # the planner's method: no RTN plan measured
    at.selectbox(key="planner_method").set_value("gptq-seq").run()
    assert at.checkbox(key="planner_use_fit_gptq-seq_True").value  # on by default once plans of its method are measured
    at.radio(key="planner_budget_kind").set_value("bits/weight").run()
    at.number_input(key="planner_budget_bits/weight").set_value(4.0)
    at.button(key="run_planner").click().run()
    assert not at.exception, at.exception
    assert at.session_state["planner_result"]["status"] == "optimal"


def test_a_fit_that_misses_its_held_out_plans_by_more_than_x2_says_to_trust_measured_plans(stored_tiny):
    """Plans that measure against their scores (more 3-bit modules, less KL) leave no model of the scores that
    predicts them: the page says how far off it is and what to trust instead."""
    store_scores(stored_tiny)
    store_measured({"w4": 1.9, "w3": 0.2, "mixed": 2.5, "w3 front": 0.3})
    at = page().run()
    assert not at.exception, at.exception
    (warning,) = [w.value for w in at.warning if "either way" in w.value]
    assert "Trust measured figures" in warning and "keeps it when no plan beats it" in warning


def explain_table(at):
    return next(d.value for d in at.dataframe if list(d.value.columns) == ["rule", "action", "selector", "count",
                                                                            "matched", "note"])


def test_explain_rules_table(stored_tiny):
    at = page().run()
    assert not at.exception
    assert any(e.label == "Explain rules" for e in at.expander)
    table = explain_table(at).set_index("rule")
    assert table.loc["1", "count"] == 21
    assert table.loc["1", "matched"] == "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj in blocks 0-2"
    assert table.loc["none", "matched"] == "model.embed_tokens, lm_head" and table["count"].sum() == 23
    # a rule that earlier rules shadow: the page refuses the plan and the opened table says by which rule
    at.text_area[0].set_value("version: 1\nrules:\n- {kind: [q, k], keep: true}\n"
                              "- {kind: [q], blocks: [1], keep: true}\n- {kind: [v], weights: {bits: 8}}\n").run()
    assert any("matches only modules that earlier rules already decide" in e.value for e in at.error)
    table = explain_table(at).set_index("rule")
    assert table.loc["2", "count"] == 0 and "decided by earlier rule 1" in table.loc["2", "note"]


def test_a_llama_cpp_mix_is_a_preset_with_its_types_and_exact_size(stored_tiny):
    at = page().run()
    w4_size = metric(at, "Packed size")
    at.selectbox(key="plan_preset").set_value("llama.cpp Q4_K_M imatrix").run()
    at.button(key="use_preset").click().run()
    assert not at.exception and not at.error
    draft = at.session_state["plan_draft"]
    assert "ggml: Q" in draft and "method: imatrix" in draft and "llama-quantize Q4_K_M" in draft
    whole = totals(resolve(stored_tiny, load_plan(draft)), stored_tiny)["total_packed_bytes"]  # llama.cpp's blocks
    assert metric(at, "Packed size") == f"{whole / 1e6:,.1f} MB" != w4_size
    assert any(b.label == "Evaluate llama.cpp mixes" for b in at.button)


def test_method_menu_lists_every_method_with_its_description(stored_tiny):
    from shrink_core.plan.spec import INT_METHODS, METHOD_DESCRIPTIONS

    at = page().run()
    assert not at.exception
    menu = at.selectbox(key="bulk_method")
    assert list(menu.options) == ["rtn", "gptq", "gptq-seq"] == list(INT_METHODS)
    assert all(f"**{m}**: {METHOD_DESCRIPTIONS[m]}" in menu.help for m in INT_METHODS)
    # a bulk edit with the sequential method writes it into the plan
    at.selectbox(key="bulk_setting").set_value("w4g64").run()
    menu.set_value("gptq-seq").run()
    at.button(key="bulk_apply").click().run()
    assert not at.exception and "method: gptq-seq" in at.session_state["plan_draft"]


def test_the_loop_offers_a_calibrated_methods_own_scores_only_for_a_calibrated_method(stored_tiny):
    """RTN's scores are the scan's own: no option. With GPTQ the loop may plan on the scan scaled by GPTQ's own error
    (off by default: it applies GPTQ once per setting first), and the help says what it costs and what it bought."""
    store_scores(stored_tiny)
    at = page().run()
    assert not at.exception, at.exception
    assert not [c for c in at.checkbox if c.key.startswith("loop_method_scores")]
    at.selectbox(key="planner_method").set_value("gptq").run()
    box = at.checkbox(key="loop_method_scores_gptq")
    assert box.value is False and "once per setting" in box.label and "0.68x" in box.help


def test_the_calibration_mix_of_a_calibrated_draft_is_edited_in_place_and_a_bad_one_refused(stored_tiny):
    """The w4g64 preset calibrates (GPTQ-seq): its mix is shown and can be replaced; the draft keeps its rules and
    sequences. A slice that does not exist is one sentence, and the draft is untouched."""
    at = page().run()
    assert not at.exception, at.exception
    box = next(t for t in at.text_input if t.label == "Calibration mix")
    assert box.value == "en=0.3,fr=0.1,de=0.1,es=0.1,ru=0.1,zh=0.1,ja=0.1,ar=0.1,code=0.1,arith=0.1"
    before = load_plan(next(t for t in at.text_area if t.label == "plan.yaml").value)
    box.set_value("en=0.5,code=0.25,arith=0.25").run()
    at.button(key="use_calib_mix").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    box = next(t for t in at.text_input if t.label == "Calibration mix")
    assert box.value == "en=0.5,code=0.25,arith=0.25"
    plan = load_plan(next(t for t in at.text_area if t.label == "plan.yaml").value)
    assert dict(plan.calibration.mix) == {"en": 0.5, "code": 0.25, "arith": 0.25}
    assert plan.calibration.n_sequences == 64 and plan.rules == before.rules and before.calibration.n_sequences == 64
    box.set_value("en=0.5,klingon=0.5").run()
    at.button(key="use_calib_mix").click().run()
    assert len(at.error) == 1 and at.error[0].value.startswith("There is no slice 'klingon'; choose from: ")
    plan = load_plan(next(t for t in at.text_area if t.label == "plan.yaml").value)
    assert dict(plan.calibration.mix) == {"en": 0.5, "code": 0.25, "arith": 0.25}  # nothing lost


def test_a_scored_language_the_calibration_mix_never_shows_is_named_until_the_mix_holds_it(stored_tiny):
    """Scores on en, hi and long: the default mix holds no Hindi (a warning with the fix) and no long documents (a
    caption: English, but a domain outside the mix). With hi=0.1 in the mix only the caption stays."""
    store_scores(stored_tiny, slices=("en", "hi", "long"))
    at = page().run()
    assert not at.exception, at.exception
    (warning,) = [w.value for w in at.warning if "calibration mix holds no text" in w.value]
    assert "language of hi," in warning and "e.g. hi=0.1" in warning and "long is outside the mix too" in warning
    box = next(t for t in at.text_input if t.label == "Calibration mix")
    box.set_value(box.value + ",hi=0.1").run()
    at.button(key="use_calib_mix").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert not [w for w in at.warning if "calibration mix holds no text" in w.value]
    assert [c.value for c in at.caption if c.value.startswith("long is outside the mix:")]


def test_a_calibrated_drafts_prediction_stands_on_its_methods_stored_error_ratios_for_its_mix(stored_tiny):
    """The w4g64 preset quantizes with gptq-seq. Without its ratios the page says the scores are RTN's; with the
    closed loop's stored ratios for the draft's own calibration mix, the additive prediction is the scan's scores
    scaled by them (0.5 here: half). Ratios measured with another mix are not this draft's."""
    from shrink_core.evaluation.calibration import CalibrationRecipe, recipe_for
    from shrink_core.results.method_ratios import save_ratios
    from shrink_core.sensitivity.probe import SCAN_DEPTHS

    store_scores(stored_tiny)
    at = page().run()
    assert not at.exception, at.exception
    assert any("scores are plain RTN's: no gptq-seq error ratios are stored" in c.value for c in at.caption)
    rtn = float(metric(at, "Predicted worst slice").split()[0])
    recipe = recipe_for(load_plan(at.session_state["plan_draft"])).to_dict()
    linears = [r.name for r in stored_tiny if r.block is not None and r.kind in ("q", "k", "v", "o", "gate", "up",
                                                                                   "down")]
    ratios = {(m, "w4g64", s): 0.5 for m in linears for s in ("en", "zh")}
    other = CalibrationRecipe.parse("en=1", n_sequences=64).to_dict()
    save_ratios(Store(), SPEC, "tiny", "cpu", SCAN_DEPTHS["fast"], "gptq-seq", other, ratios)
    at.run()
    assert float(metric(at, "Predicted worst slice").split()[0]) == pytest.approx(rtn)  # another mix's: unused
    save_ratios(Store(), SPEC, "tiny", "cpu", SCAN_DEPTHS["fast"], "gptq-seq", recipe, ratios)
    at.run()
    assert not at.exception, at.exception
    assert float(metric(at, "Predicted worst slice").split()[0]) == pytest.approx(rtn / 2, rel=1e-3)
    (caption,) = [c.value for c in at.caption if c.value.startswith("Scores scaled by gptq-seq's own output error")]
    # w3g64's scores have no ratio: they stay RTN's
    assert "median ratio en 0.50, zh 0.50" in caption and f"{len(ratios)} of {2 * len(ratios)} scores" in caption


def test_rotating_inputs_is_a_tick_on_the_draft_and_keeps_its_rules(stored_tiny):
    at = page().run()
    assert not at.exception, at.exception
    box = next(c for c in at.checkbox if c.label.startswith("Rotate inputs"))
    assert box.value is False
    before = load_plan(at.session_state["plan_draft"])
    box.check().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    plan = load_plan(at.session_state["plan_draft"])
    assert plan.rotate is not None and plan.rotate.kind == "hadamard" and plan.rules == before.rules
    assert plan.name.endswith(", inputs rotated")  # its candidates are not named as the unrotated plan's
    assert "rotate: {kind: hadamard, seed: 0}" in next(t for t in at.text_area if t.label == "plan.yaml").value
    assert any("do not count the rotation" in c.value for c in at.caption)
    next(c for c in at.checkbox if c.label.startswith("Rotate inputs")).uncheck().run()
    assert load_plan(at.session_state["plan_draft"]).rotate is None
    assert "rotated" not in load_plan(at.session_state["plan_draft"]).name


def test_a_rotated_drafts_prediction_stands_on_the_rotated_methods_ratios_never_the_plain_ones(stored_tiny):
    """Ticking the rotation makes the draft another scored method: the plain method's stored ratios no longer scale
    its prediction, the rotated method's do once stored, and the closed loop offers to measure them, RTN included."""
    from shrink_core.evaluation.calibration import recipe_for
    from shrink_core.results.method_ratios import save_ratios
    from shrink_core.sensitivity.probe import SCAN_DEPTHS

    store_scores(stored_tiny)
    at = page().run()
    rtn = float(metric(at, "Predicted worst slice").split()[0])
    recipe = recipe_for(load_plan(at.session_state["plan_draft"])).to_dict()
    linears = [r.name for r in stored_tiny if r.block is not None and r.kind in ("q", "k", "v", "o", "gate", "up",
                                                                                   "down")]
    save_ratios(Store(), SPEC, "tiny", "cpu", SCAN_DEPTHS["fast"], "gptq-seq", recipe,
                {(m, "w4g64", s): 0.5 for m in linears for s in ("en", "zh")})
    at.run()
    assert float(metric(at, "Predicted worst slice").split()[0]) == pytest.approx(rtn / 2, rel=1e-3)
    assert not [c for c in at.checkbox if c.key.startswith("loop_method_scores")]  # plain rtn: the scan's own
    next(c for c in at.checkbox if c.label.startswith("Rotate inputs")).check().run()
    assert not at.exception, at.exception
    assert float(metric(at, "Predicted worst slice").split()[0]) == pytest.approx(rtn)  # the plain ratios: unused
    label = "gptq-seq with rotated inputs (hadamard, seed 0)"
    assert any(f"no {label} error ratios are stored" in c.value for c in at.caption)
    box = at.checkbox(key="loop_method_scores_rtn+hadamard:0")  # rotated RTN is not the RTN the scan scored
    assert box.label.startswith("Plan on rtn with rotated inputs (hadamard, seed 0)'s own error")
    save_ratios(Store(), SPEC, "tiny", "cpu", SCAN_DEPTHS["fast"], "gptq-seq+hadamard:0", recipe,
                {(m, "w4g64", s): 0.25 for m in linears for s in ("en", "zh")})
    at.run()
    assert float(metric(at, "Predicted worst slice").split()[0]) == pytest.approx(rtn / 4, rel=1e-3)
    assert any(c.value.startswith(f"Scores scaled by {label}'s own output error") for c in at.caption)


def test_tuning_scales_is_a_tick_on_the_draft_and_keeps_its_rules(stored_tiny):
    at = page().run()
    box = next(c for c in at.checkbox if c.label.startswith("Tune scales"))
    assert box.value is False
    before = load_plan(at.session_state["plan_draft"])
    box.check().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    plan = load_plan(at.session_state["plan_draft"])
    assert plan.tune is not None and plan.tune.kind == "scales" and plan.rules == before.rules
    assert plan.needs_calibration and plan.name.endswith(", scales tuned")
    assert "tune: {kind: scales, steps: 100" in next(t for t in at.text_area if t.label == "plan.yaml").value
    from shrink_core.compression.calibrate import cpu_has_bf16

    forward = "bfloat16" if cpu_has_bf16() else "float32"
    assert any("do not count its gain" in c.value and f"this CPU runs them in {forward}" in c.value for c in at.caption)
    next(c for c in at.checkbox if c.label.startswith("Tune scales")).uncheck().run()
    assert load_plan(at.session_state["plan_draft"]).tune is None
    assert "tuned" not in load_plan(at.session_state["plan_draft"]).name

