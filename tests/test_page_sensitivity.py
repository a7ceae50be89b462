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


def figure(at, key):
    """The Plotly figure a chart element carries, as the browser receives it."""
    import json

    return json.loads(next(c for c in charts(at) if key in c.proto.id).proto.spec)


def test_heatmaps_are_full_labelled_grids_with_missing_cells_missing(shrink_home):
    loaded = tiny_loaded()  # 3 blocks of 7 linear kinds
    run_scan(loaded, ["toy_en", "toy_pairs"], ["w2g64"], "fast", "quick", check=4, store=Store())
    exact = {r.module: r.value for r in run_scan(loaded, ["toy_en"], ["w2g64"], "fast", "quick", store=Store()).records
             if r.method == "fast" and r.metric == "kl"}
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_spec"] = "toy:tiny"
    at.run()
    assert not at.exception
    kinds = ["q", "k", "v", "o", "gate", "up", "down"]
    fig = figure(at, "heat-toy_en")
    heat, cells = fig["data"][0], fig["data"][1]
    assert heat["type"] == "heatmap" and len(heat["z"]) == 3 and all(len(row) == 7 for row in heat["z"])
    assert all(v is not None for row in heat["z"] for v in row)  # the fast view scores every module
    axes = fig["layout"]
    assert axes["xaxis"]["tickvals"] == kinds  # every kind labelled, not every other one
    assert axes["yaxis"]["tickvals"] == [0, 1, 2] and axes["yaxis"]["range"] == [2.5, -0.5]  # no padding rows
    title = heat["colorbar"]["title"]["text"]
    assert max(len(line) for line in title.split("<br>")) <= 12, title  # fits above a narrow colour bar
    placeholders = {f"#0000{n:02d}" for n in range(1, 11)}  # Streamlit repaints these with theme colours
    assert not any(color.lower() in placeholders for _, color in heat["colorscale"])
    hover = dict(zip(cells["customdata"], cells["text"]))
    down = "model.layers.1.mlp.down_proj"
    assert f"KL = {exact[down]:.6g} nats/token" in hover[down]  # the exact value and where it came from
    assert "fast, w2g64, slice toy_en, quick depth" in hover[down]
    # the exhaustive view (the agreement check probed 4 modules per slice): the same grid, the rest missing
    at.radio(key="view_method").set_value("exhaustive").run()
    assert not at.exception
    heat = figure(at, "heat-toy_en")["data"][0]
    assert len(heat["z"]) == 3 and all(len(row) == 7 for row in heat["z"])
    assert sum(v is not None for row in heat["z"] for v in row) == 4


def test_a_click_on_a_cell_opens_its_module_detail(shrink_home):
    loaded = tiny_loaded()
    run_scan(loaded, ["toy_en", "toy_pairs"], ["w2g64"], "fast", "quick", check=4, store=Store())
    exact = {r.module: r.value for r in run_scan(loaded, ["toy_en"], ["w2g64"], "fast", "quick", store=Store()).records
             if r.method == "fast" and r.metric == "kl"}
    down = "model.layers.1.mlp.down_proj"
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_spec"] = "toy:tiny"
    at.run()
    assert at.selectbox(key="detail_module").value != down
    # the chart's selection, as the browser reports a click on the cell (kind down, block 1)
    at.session_state["heat-toy_pairs"] = {"selection": {"points": [{"x": "down", "y": 1}], "point_indices": [0],
                                                        "box": [], "lasso": []}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="detail_module").value == down
    detail = at.dataframe[1].value  # agreement table, then the module detail
    row = detail[(detail["method"] == "fast") & (detail["metric"] == "kl")].iloc[0]
    assert row["toy_en"] == exact[down]


def test_the_scan_button_shows_its_predicted_memory_and_refuses_what_will_not_fit(shrink_home, monkeypatch):
    from shrink_core.model.inventory import inventory, summary

    loaded = tiny_loaded()
    rows = inventory(loaded.model)
    Store().save_model({"spec": "toy:tiny", "source_dir": ".", "weights_hash": "hash0", "load_seconds": 0.1,
                        "from_cache": False, "notes": [], "code_version": "x", "device": "cpu fp32 (test)",
                        "summary": summary(loaded.model, rows), "modules": [r.row() for r in rows]})
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["model_spec"] = "toy:tiny"
    at.run()
    assert any(c.value.startswith("Predicted peak memory: about 0.") for c in at.caption)
    assert not at.button(key="run_scan").disabled
    monkeypatch.setenv("SHRINK_MEMORY_LIMIT_GB", "0.2")
    at.run()
    (error,) = [e.value for e in at.error]
    assert error.startswith("This fast scan would need about 0.") and "0.2 GB available" in error
    assert at.button(key="run_scan").disabled
