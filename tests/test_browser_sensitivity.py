"""The Sensitivity page in a real browser: a heatmap per slice, a cell click, protect top-k into the plan draft."""
import os
import shutil

import pytest

from .browser import CHROMEDRIVER, CHROMIUM, chromium, running_app, wait_for

pytestmark = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                       reason="Debian's chromium and chromium-driver are not installed (./run test installs them)"),
]


def body(driver) -> str:
    return driver.find_element("tag name", "body").text


def test_heatmap_per_slice_and_protect_top_k(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("SHRINK_HOME", str(home))
    from shrink_core.models import load
    from shrink_core.sensitivity import run_scan

    # a short real scan first (quick budget: 4 x 64 calibration tokens per slice), so the page has scores to show
    run_scan(load("builtin:smollm2-135m"), ["en", "zh"], ["w3g64"], "fast", "quick")
    with running_app(home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/sensitivity")
            wait_for(driver, lambda d: "en: w3g64" in body(d) and "zh: w3g64" in body(d), 120,
                     "a heatmap for each slice")
            plots = driver.find_elements("css selector", ".js-plotly-plot")
            assert len(plots) >= 2
            assert "Traceback" not in body(driver)
            driver.save_screenshot(os.path.join(tmp_path, "sensitivity.png"))
            button = wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button")
                                                      if b.text.startswith("Protect top-k")), None), 30,
                              "the Protect top-k button")
            driver.execute_script("arguments[0].scrollIntoView();", button)
            button.click()
            wait_for(driver, lambda d: "The plan draft now holds 10 rules" in body(d), 60, "the plan draft message")
        finally:
            driver.quit()
