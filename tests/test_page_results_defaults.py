"""Defaults a first run hits on the Results page: the worst-slice set, the limit per metric, beyond-limit warnings,
the projection target, the perplexity note."""
from streamlit.testing.v1 import AppTest

from shrink_core.perf.hardware import DEFAULT_TARGET
from shrink_core.results.store import Provenance, Store

from .test_candidates import SPEC, _payload, seed_store
from .test_page_results import PAGE, _chart_spec, _frame


def _extra_slice(store, ids):
    """w8 (and its reference, as `eval` does) were also evaluated on 'hi', a slice no other candidate has."""
    for name, ppl in (("reference", 9.0), ("w8", 9.1)):
        store.add_result("eval", Provenance(SPEC, "h0", "test", "cpu (test)", slice="hi", budget="fast"),
                         _payload("hi", ppl, 99, kl=0.001), candidate_id=ids[name])


def test_worst_slice_defaults_to_the_shared_slices_and_names_the_rest(shrink_home):
    store = Store()
    ids = seed_store(store)
    _extra_slice(store, ids)
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception, at.exception
    points = _frame(at, "on_frontier").set_index("name")
    assert points.loc["w8", "y"] == points.loc["w8", "y"] and points.loc["w4", "y"] == points.loc["w4", "y"]
    assert points.loc["w8", "on_frontier"] and points.loc["w4", "on_frontier"]  # both plotted, not dropped
    assert "hi" not in at.multiselect(key="res_slices_ppl_ratio_fast").value
    assert any("Not in the worst-slice set: hi (only reference, w8)" in i.value for i in at.info)


def test_limit_follows_the_metric_and_beyond_limit_rows_are_flagged(shrink_home):
    seed_store(Store())
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert any("en-star on ar: perplexity +60%" in w.value for w in at.warning)  # beyond +5% on ar
    at.selectbox(key="res_metric").set_value("top1_agree").run()
    assert not at.exception, at.exception
    limit = at.number_input(key="res_limit_top1_agree")
    assert limit.value == 0.9 and "share of tokens" in limit.label
    points = _frame(at, "on_frontier").set_index("name")
    assert not points.loc["en-star", "acceptable"] and points.loc["w8", "acceptable"]  # 0.5 vs 0.99 top-1 agreement
    lines = [s for s in _chart_spec(at, "pareto_main")["layout"]["shapes"] if s.get("type") == "line"]
    assert [s["y0"] for s in lines] == [0.9]
    at.selectbox(key="res_metric").set_value("kl").run()
    assert at.number_input(key="res_limit_kl").value == 0.05 and "nats/token" in at.number_input(
        key="res_limit_kl").label


def test_projection_target_is_the_default_everywhere_and_ppl_is_noted(shrink_home):
    seed_store(Store())
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert at.selectbox(key="res_target").value == DEFAULT_TARGET
    assert any("Perplexity is per token" in c.value for c in at.caption)
    at.selectbox(key="res_x").set_value("projected").run()
    assert not at.exception, at.exception
    xaxis = _chart_spec(at, "pareto_main")["layout"]["xaxis"]
    assert xaxis.get("range") == [0, 1]  # nothing projected in this store: 0..1, never -1
