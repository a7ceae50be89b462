"""Plan drafts are hard to lose: one undo history for every change, saved per model, the planner keeps hand edits,
the name follows the content, 2:4 counts at its sparse bytes, and the bulk edit changes nothing until asked."""
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.plan import dump_plan, load_plan, resolve, totals
from shrink_core.results.store import Store

from .test_page_plan import SPEC, metric, page, store_scores, stored_tiny  # noqa: F401 (a fixture)


def test_the_draft_survives_a_browser_reload(stored_tiny):  # noqa: F811
    at = page().run()
    at.selectbox(key="plan_preset").set_value("w8").run()
    at.button(key="use_preset").click().run()
    assert Store().draft(SPEC) == at.session_state["plan_draft"]
    reloaded = page().run()  # a new session, as after a reload
    assert not reloaded.exception
    assert "bits: 8" in reloaded.session_state["plan_draft"] and "group_size: 64" not in reloaded.session_state["plan_draft"]
    assert Store().plans() == []  # the draft is not listed among saved plans


def test_the_name_follows_the_content_unless_the_user_named_it(stored_tiny):  # noqa: F811
    at = page().run()
    at.selectbox(key="plan_preset").set_value("w4g64-keep-ends").run()
    at.button(key="use_preset").click().run()
    assert load_plan(at.session_state["plan_draft"]).name == "w4g64-keep-ends"
    at.multiselect(key="bulk_kinds").set_value(["q", "k"]).run()  # block 1's q and k to w3g64 rtn
    at.slider(key="bulk_blocks").set_value((1, 1))
    at.selectbox(key="bulk_method").set_value("rtn")
    at.selectbox(key="bulk_setting").set_value("w3g64").run()
    at.button(key="bulk_apply").click().run()
    assert not at.exception and not at.error
    plan = load_plan(at.session_state["plan_draft"])
    assert plan.name == "mixed w3g64/w4g64 gptq-seq/rtn, 14 kept"  # blocks 0 and 2 (7 linears each) are kept
    assert "first and last blocks" not in plan.description  # the preset's description went with its name
    assert load_plan(Store().draft(SPEC)).name == plan.name  # what Results and the report will be handed
    next(t for t in at.text_input if t.label == "Plan name").set_value("my plan").run()
    at.selectbox(key="bulk_setting").set_value("w8").run()
    at.button(key="bulk_apply").click().run()
    assert load_plan(at.session_state["plan_draft"]).name == "my plan"  # named on the page: kept across edits


def test_bulk_edit_changes_nothing_until_a_setting_is_chosen(stored_tiny):  # noqa: F811
    at = page().run()
    assert at.selectbox(key="bulk_setting").value == "(no change)"
    assert at.button(key="bulk_apply").disabled


def test_two_four_pruning_counts_at_its_sparse_bytes(stored_tiny):  # noqa: F811
    at = page().run()
    at.selectbox(key="plan_preset").set_value("nm24").run()
    at.button(key="use_preset").click().run()
    assert not at.exception
    plan = load_plan(at.session_state["plan_draft"])
    resolved = resolve(stored_tiny, plan)
    whole = totals(resolved, stored_tiny)  # modules at their sparse bytes plus the norms (exact: test_byte_accounting)
    assert whole["other_bytes"] > 0
    assert metric(at, "Packed size") == f"{whole['total_packed_sparse_bytes'] / 1e6:,.1f} MB"
    assert whole["packed_sparse_bytes"] < whole["packed_bytes"]
    assert any("2:4 values + index metadata" in c.value for c in at.caption)


def test_the_planner_keeps_hand_edits_and_their_rules(stored_tiny):  # noqa: F811
    store_scores(stored_tiny)
    at = page().run()
    by_hand = dump_plan(load_plan({"version": 1, "rules": [
        {"name": r"model\.layers\.1\.self_attn\.q_proj", "weights": {"bits": 8, "group_size": "channel",
                                                                      "symmetric": True, "method": "rtn"},
         "note": "hand edit"},
        {"name": r"model\.layers\.1\.mlp\.up_proj", "prune": {"structure": "nm", "n": 2, "m": 4,
                                                              "criterion": "magnitude"}, "note": "hand edit"},
        {"kind": ["q", "k", "v", "o", "gate", "up", "down"], "weights": {"bits": 4, "group_size": 64}}]}))
    at.text_area[0].set_value(by_hand).run()
    assert not at.error
    at.radio(key="planner_budget_kind").set_value("bits/weight").run()
    at.number_input(key="planner_budget_bits/weight").set_value(20.0)
    at.button(key="run_planner").click().run()
    assert not at.exception and at.session_state["planner_result"]["status"] == "optimal"
    plan = load_plan(at.session_state["plan_draft"])
    assert "planner: " in at.session_state["plan_draft"]
    decided = {r.name: r for r in resolve(stored_tiny, plan)}
    assert decided["model.layers.1.self_attn.q_proj"].bits == 8
    assert decided["model.layers.1.mlp.up_proj"].prune.structure == "nm"
    assert sum(r.note == "hand edit" for r in plan.rules) == 2


def test_protect_top_k_is_an_undo_step_and_is_saved(shrink_home):
    from shrink_core.sensitivity import run_scan

    from .test_sensitivity import tiny_loaded

    run_scan(tiny_loaded(), ["toy_en"], ["w2g64"], "fast", "quick", check=0, store=Store())
    before = dump_plan(load_plan("preset:w8"))
    Store().save_draft("toy:tiny", before)  # the draft the user had on the Plan page
    at = AppTest.from_file(str(REPO_ROOT / "app_pages" / "sensitivity.py"), default_timeout=60)
    at.session_state["model_spec"] = "toy:tiny"
    at.run()
    at.button(key="plan-keep").click().run()
    assert not at.exception
    after = at.session_state["plan_draft"]
    assert after != before and at.session_state["plan_history"] == [before]  # Undo on the Plan page brings it back
    assert Store().draft("toy:tiny") == after
