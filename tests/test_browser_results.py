"""End to end in a real browser: real candidates (SmolLM2 on toy slices) on the Results page's Pareto plot and compare
table."""
from shrink_core.model.describe import describe
from shrink_core.results.eval_run import run_eval
from shrink_core.results.store import Store

from .browser import BROWSER_MARKS, chromium, running_app, wait_for

pytestmark = BROWSER_MARKS
SPEC = "builtin:smollm2-135m"
W4_RTN = ("version: 1\nname: w4g64-rtn\nrules:\n  - kind: [q, k, v, o, gate, up, down]\n"
          "    weights: {bits: 4, group_size: 64, method: rtn}\n")


def grid_cells(driver):
    return [cell.get_attribute("textContent") for cell in driver.find_elements("css selector", '[role="gridcell"]')]


def plot_labels(driver):
    return {e.get_attribute("textContent") for e in
            driver.find_elements("css selector", ".js-plotly-plot .scatterlayer .textpoint")}


def test_results_page_shows_real_candidates(shrink_home, tmp_path):
    store = Store()
    store.save_model(describe(SPEC))  # the inventory, for the layer-by-layer diff
    for plan in ("preset:w8", W4_RTN):
        run_eval(SPEC, ["toy_en", "toy_mc"], "fast", plan, store=store)
    names = {c["name"] for c in store.candidates()}
    assert {"w8", "w4g64-rtn"} <= names
    with running_app(shrink_home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/results")
            wait_for(driver, lambda d: {"w8", "w4g64-rtn"} <= plot_labels(d), 300, "both candidates on the Pareto plot")
            body = driver.find_element("tag name", "body").text
            assert "Traceback" not in body
            titles = {e.get_attribute("textContent") for e in driver.find_elements("css selector", ".g-xtitle, .g-ytitle")}
            assert any("computed from the packed format" in t for t in titles), titles
            assert any("measured on cpu" in t for t in titles), titles
            wait_for(driver, lambda d: {"w8", "w4g64-rtn", "baseline", "vs baseline"} <= set(grid_cells(d)), 60,
                     "the compare table")
            assert {"toy_en", "toy_mc"} <= set(grid_cells(driver))  # a row per slice
            wait_for(driver, lambda d: {"int4 g64 asym rtn", "int8 channel sym rtn", "model.layers.0.mlp.down_proj"}
                     <= set(grid_cells(d)), 60, "what changed, layer by layer")
            driver.save_screenshot(str(tmp_path / "results-page.png"))
        finally:
            driver.quit()
