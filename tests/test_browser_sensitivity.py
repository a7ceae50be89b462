"""The Sensitivity page in a real browser: a heatmap per slice, protect top-k, and the rules on the Plan page."""
import os

from .browser import BROWSER_MARKS, body, chromium, running_app, wait_for

pytestmark = BROWSER_MARKS


def test_heatmap_per_slice_and_protect_top_k(scanned_home, tmp_path):
    from shrink_core.model.load import load
    from shrink_core.sensitivity import run_scan

    # what the Model page stores on load (the Plan page checks plans against it), then a short real scan (quick
    # depth: 4 x 64 calibration tokens per slice), so the page has scores to show: the session's scan of the user's
    # slice user_notes (shared with the Plan test), and the built-in zh scanned here (user_notes' records are reused)
    home = scanned_home
    report = run_scan(load("builtin:smollm2-135m"), ["user_notes", "zh"], ["w3g64"], "fast", "quick")
    assert report.reused > 0 and report.computed > 0  # user_notes from the shared store, zh here
    with running_app(home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/sensitivity")
            wait_for(driver, lambda d: "user_notes: w3g64" in body(d) and "Slice zh" in body(d), 120,
                     "a heatmap for each slice, one tab each")
            # the tab labels come before the charts draw (each tab's chart renders, hidden, behind its label)
            wait_for(driver, lambda d: len(d.find_elements("css selector", ".js-plotly-plot")) >= 2, 120,
                     "the user_notes and zh heatmaps drawn")
            assert "Traceback" not in body(driver)
            driver.save_screenshot(os.path.join(tmp_path, "sensitivity.png"))
            button = wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button")
                                                      if b.text.startswith("Protect top-k")), None), 30,
                              "the Protect top-k button")
            driver.execute_script("arguments[0].scrollIntoView();", button)
            button.click()
            wait_for(driver, lambda d: "The plan draft now holds 10 rules" in body(d), 60, "the plan draft message")
            # the rules land on the Plan page (same session, through the app's navigation), as editable plan text
            link = wait_for(driver, lambda d: next((a for a in d.find_elements("css selector", "a[href]")
                                                    if a.get_attribute("href").rstrip("/").endswith("/plan")), None),
                            30, "the Plan page link")
            driver.execute_script("arguments[0].click();", link)

            def plan_text(d):
                areas = [a for a in d.find_elements("tag name", "textarea") if a.get_attribute("aria-label") == "plan.yaml"]
                return areas[0].get_attribute("value") if areas else ""
            wait_for(driver, lambda d: plan_text(d).count("keep: true") >= 10, 90, "ten keep rules in the Plan's plan.yaml")
            text = plan_text(driver)
            assert "layers" in text and "Traceback" not in body(driver)  # module names (regex-escaped) in the rules
        finally:
            driver.quit()
