"""The Sensitivity page with AppTest: a heatmap per slice from stored scores, trust figures, protect top-k."""
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.plan import load_plan
from shrink_core.results.store import Store
from shrink_core.sensitivity import run_scan

from .test_sensitivity import tiny_loaded

PAGE = str(REPO_ROOT / "app_pages" / "sensitivity.py")


def charts(at):
    return list(at.get("plotly_chart"))


def test_empty_store_invites_a_scan(shrink_home):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("No sensitivity scores" in i.value for i in at.info)


def test_heatmaps_per_slice_and_protect_top_k_fills_the_plan_draft(shrink_home):
    loaded = tiny_loaded()
    run_scan(loaded, ["toy_en", "toy_pairs"], ["w8", "w2g64"], "fast", "quick", check=12, store=Store())
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_spec"] = "toy:tiny"
    at.run()
    assert not at.exception
    assert len(charts(at)) >= 3  # one heatmap per slice + the layer x slice view (+ the agreement scatter)
    assert any("toy_en: estimated; Spearman" in c.value for c in at.caption)
    table = at.dataframe[0].value  # the agreement table (the module detail table comes after it)
    assert set(table["slice"]) == {"toy_en", "toy_pairs"} and (table["modules"] == 12).all()
    assert any("Embedding (with a tied lm_head)" in c.value for c in at.caption)  # its exhaustive scores
    embedding = at.dataframe[-1].value
    assert list(embedding.columns) == ["toy_en", "toy_pairs"] and (embedding.values > 0).all()
    at.selectbox(key="view_setting").set_value("w2g64")
    at.number_input(key="protect_k").set_value(3)
    at.selectbox(key="rank_by").set_value("toy_en")
    at.run()
    at.button(key="plan-keep").click().run()
    assert not at.exception
    plan = load_plan(at.session_state["plan_draft"])
    assert [r.keep for r in plan.rules] == [True, True, True, False]
    assert plan.rules[-1].weights.bits == 2
    # the kept modules are the three highest-KL modules of toy_en under w2g64
    scores = {}
    for r in run_scan(loaded, ["toy_en"], ["w2g64"], "fast", "quick", metrics=("kl",), store=Store()).records:
        if r.method == "fast":  # the page ranks the viewed method's records (the embedding's are exhaustive)
            scores[r.module] = r.value
    top3 = sorted(scores, key=scores.get, reverse=True)[:3]
    assert [r.name.replace("\\", "") for r in plan.rules[:3]] == top3
