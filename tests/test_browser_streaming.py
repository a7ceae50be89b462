"""Streaming in a real browser: a baseline's finished slices show on the Eval sets page while the job still runs,
the rest marked pending; the status strip's links lead to the pages."""
import os
import re

from .browser import BROWSER_MARKS, body, chromium, last_job_id, running_app, wait_for, wait_on_job
from .test_browser import grid_cells

pytestmark = BROWSER_MARKS
SLICES = ("en", "fr")  # the page's default choice


def _shots(tmp_path) -> str:
    """Where screenshots go: $SHRINK_SCREENSHOTS when set (to look at them), else the test's own folder."""
    return os.environ.get("SHRINK_SCREENSHOTS") or str(tmp_path)


def test_a_baseline_shows_each_slice_before_the_job_ends(shrink_home, tmp_path):
    with running_app(shrink_home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/evalsets")
            wait_for(driver, lambda d: "Run baseline" in body(d) and "next: Load a model" in body(d), 120,
                     "the Eval sets page with the status strip")
            driver.save_screenshot(os.path.join(_shots(tmp_path), "first-run-evalsets.png"))
            before = last_job_id(shrink_home)
            button = wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button")
                                                      if b.text == "Run baseline" and b.is_enabled()), None), 30,
                              "the Run baseline button")
            button.click()

            def mid_way(d):  # some slices done and shown, others still pending, the job still running
                text = body(d)
                found = re.search(r"1 of 2 slices done \((en|fr)\)", text)
                return found and "pending" in grid_cells(d) and any(c in SLICES for c in grid_cells(d))
            wait_on_job(driver, shrink_home, mid_way, "a finished slice shown while the others run", kind="eval",
                        after=before, expect="done", rerender_s=5)
            driver.save_screenshot(os.path.join(_shots(tmp_path), "streaming-evalsets.png"))
            cells = grid_cells(driver)
            assert "done" in cells and "pending" in cells
            wait_on_job(driver, shrink_home, lambda d: "pending" not in grid_cells(d)
                        and all(s in grid_cells(d) for s in SLICES) and "Perplexity per slice" in body(d),
                        "both slices done", kind="eval", after=before)
            assert "Baseline: 2 slices" in body(driver) and "Traceback" not in body(driver)
            # the strip's next step links to the Sensitivity page
            link = next(a for a in driver.find_elements("css selector", "a[href]")
                        if "Scan: none yet" in a.text and a.get_attribute("href").rstrip("/").endswith("/sensitivity"))
            driver.execute_script("arguments[0].click();", link)
            wait_for(driver, lambda d: "No sensitivity scores for this model yet" in body(d), 60,
                     "the Sensitivity page's empty state, reached from the strip")
        finally:
            driver.quit()
