"""The Results page with AppTest, on a store seeded with candidates of known dominance."""
import json

from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results.store import Store

from .test_candidates import seed_store

PAGE = str(REPO_ROOT / "app_pages" / "results.py")


def _chart_spec(at, key):
    chart = next(c for c in at.get("plotly_chart") if c.proto.id.endswith(key))
    return json.loads(chart.proto.spec)


def _frame(at, column):
    """The first table with this column (AppTest does not expose a dataframe's key)."""
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_empty_store_invites_an_evaluation(shrink_home):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    assert any("No evaluated candidates yet" in i.value for i in at.info)


def test_pareto_compare_and_management(shrink_home):
    ids = seed_store(Store())
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    points = _frame(at, "on_frontier").set_index("name")
    assert points.loc["w8", "on_frontier"] and points.loc["w4", "on_frontier"]
    assert not points.loc["en-star", "on_frontier"]  # collapses on ar: dominated on the worst slice
    assert points.loc["w4-keep0", "x"] != points.loc["w4-keep0", "x"]  # no size recorded: NaN, not 0
    assert points.loc["en-star", "worst_slice"] == "ar"
    spec = _chart_spec(at, "pareto_main")
    assert "computed from the packed format" in spec["layout"]["xaxis"]["title"]["text"]
    assert "measured on cpu" in spec["layout"]["yaxis"]["title"]["text"]
    assert any("en-star" in str(trace.get("text")) for trace in spec["data"])
    hovers = " ".join(str(trace.get("customdata")) for trace in spec["data"])
    assert "plan: kind=up,down: int3 g64 asym rtn" in hovers and "calibration: ar 50%, en 50%" in hovers
    assert any(trace.get("error_y", {}).get("array") for trace in spec["data"])  # intervals drawn
    assert any(shape.get("type") == "rect" for shape in spec["layout"].get("shapes", []))  # acceptable region

    # One slice instead of the worst: en-star wins on en
    at.selectbox(key="res_y").set_value("en").run()
    points = _frame(at, "on_frontier").set_index("name")
    assert points.loc["en-star", "on_frontier"] and not points.loc["w4", "on_frontier"]

    compare = _frame(at, "role")
    assert set(compare["name"]) == {"reference", "w8", "w4"}  # the first three by default
    assert set(compare["slice"]) == {"en", "ar", "mc"}

    at.multiselect(key="res_compare").set_value([ids["w4"], ids["w4-keep0"]]).run()
    compare = _frame(at, "role")
    assert set(compare["name"]) == {"w4", "w4-keep0"}
    assert compare["paired_test"].dropna().str.contains("paired over the same items").any()
    assert any("Load toy:tiny on the Model page" in i.value for i in at.info)  # the seeded model has no inventory

    at.selectbox(key="res_manage").set_value(ids["en-star"]).run()
    assert at.button(key="res_delete").disabled  # needs the confirmation first
    at.checkbox(key=f"res_confirm_{ids['en-star']}").check().run()
    at.button(key="res_delete").click().run()
    assert not at.exception
    assert "en-star" not in set(_frame(at, "plan_summary")["name"])


def test_accuracy_view_uses_task_slices_only(shrink_home):
    seed_store(Store())
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.selectbox(key="res_metric").set_value("accuracy").run()
    assert not at.exception, at.exception
    points = _frame(at, "on_frontier").set_index("name")
    assert points.loc["w4", "y"] == 0.55 and points.loc["w4", "worst_slice"] == "mc"
    assert points.loc["w8", "on_frontier"] and not points.loc["en-star", "on_frontier"]  # 0.5 at 150 MB vs w4's 0.55


def test_compare_shows_raw_and_holm_adjusted_p_and_why_no_interval(shrink_home):
    from .test_candidates import _paired_store

    _paired_store(Store(), 4, {"en": 0.5, "fr": 0.0})
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    note = "n=4 items: too few for an interval (fewer than 20)"
    compare = _frame(at, "role").set_index(["name", "slice"])  # both candidates, picked by default
    assert {"nll_p", "nll_p_holm"} <= set(compare.columns)
    assert compare.loc[("cand", "fr"), "nll_p_holm"] >= compare.loc[("cand", "fr"), "nll_p"]
    assert compare.loc[("cand", "en"), "interval_note"] == note
    assert any("Holm-adjusted over 2 tests on 2 slices" in c.value for c in at.caption)
    points = _frame(at, "on_frontier").set_index("name")
    assert points.loc["cand", "interval_note"] == note
