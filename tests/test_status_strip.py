"""The status strip every page shares: each step of the path a link with what is done, and the next step named."""
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results.overview import next_step, steps
from shrink_core.results.store import Provenance, Store
from tests.test_page_model import _modules, _summary

APP = str(REPO_ROOT / "app.py")
SPEC = "builtin:smollm2-135m"


def test_steps_say_what_is_done_and_the_first_missing_one_is_next():
    counts = {"described": True, "baseline_slices": 2, "scanned_slices": 0, "draft": False, "candidates": 0}
    all_steps = steps(counts)
    assert [(s.label, s.done, s.detail) for s in all_steps] == [
        ("Model", True, "loaded"), ("Baseline", True, "2 slices"), ("Scan", False, "none yet"),
        ("Plan", False, "none yet"), ("Candidates", False, "none yet")]
    assert next_step(all_steps).key == "sensitivity"
    assert next_step(steps({**counts, "scanned_slices": 1, "draft": True, "candidates": 1})) is None
    ran = steps({**counts, "scanned_slices": 1, "candidates": 3})  # plans run from the CLI: no draft, yet planned
    assert [(s.label, s.done, s.detail) for s in ran[3:]] == [("Plan", True, "plans run"), ("Candidates", True, "3")]


def test_the_strip_counts_what_the_store_holds_and_links_each_page(shrink_home):
    store = Store()
    store.save_model({"spec": SPEC, "weights_hash": "h", "summary": _summary(), "modules": _modules(),
                      "load_seconds": 1.0, "from_cache": True})  # described: the Model page does not start a load
    for slice_id in ("en", "fr"):
        store.add_result("eval", Provenance(SPEC, "h", "0", "cpu fp32", slice=slice_id, budget="fast"), {"ppl": 9.0})
    store.add_result("eval", Provenance(SPEC, "h", "0", "cpu fp32", plan={"rules": []}, slice="zh", budget="fast"),
                     {"ppl": 9.5})  # a candidate's result is not a baseline slice
    assert store.overview(SPEC) == {"described": True, "baseline_slices": 2, "scanned_slices": 0, "draft": False,
                                    "candidates": 0}
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception, at.exception
    links = [(e.proto.label, e.proto.page) for e in at.get("page_link")]
    assert links == [("Model: loaded", ""), ("Baseline: 2 slices", "evalsets"), ("Scan: none yet", "sensitivity"),
                     ("Plan: none yet", "plan"), ("Candidates: none yet", "results")]
    assert any("next: Run a sensitivity scan" in c.value for c in at.caption)


def test_quick_start_submits_a_quick_scan_and_opens_the_sensitivity_page(shrink_home, monkeypatch):
    """The first run's one click from the loaded model to a heatmap: a labelled quick-depth scan of en and fr."""
    from shrink_core.runtime import jobs

    submit = jobs.submit
    monkeypatch.setattr(jobs, "submit", lambda *a, **k: submit(*a, **{**k, "spawn": False}))  # no worker here
    store = Store()
    store.save_model({"spec": SPEC, "weights_hash": "h", "summary": _summary(), "modules": _modules(),
                      "load_seconds": 1.0, "from_cache": True})
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert any("Quick start: which layers break first" in m.value for m in at.markdown)
    assert any("**quick** depth" in c.value and "not figures to decide on" in c.value for c in at.caption)
    at.button(key="quick_start").click().run()
    assert not at.exception, at.exception
    job = jobs.get(store, at.session_state["job:sensitivity"])
    assert job.kind == "sensitivity" and job.params == {"spec": SPEC, "slices": ["en", "fr"],
                                                        "settings": ["w4g64", "w3g64"], "method": "fast",
                                                        "budget": "quick", "check": 0}
    assert at.title[0].value == "Sensitivity"  # switched to the page where the heatmaps appear
