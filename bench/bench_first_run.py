"""First run on a fresh machine: from `./run app` to a per-slice heatmap, clicking only what the pages put first.

Starts the app exactly as `./run app` does (its set-up already done), with an empty $SHRINK_HOME (so the built-in
model is converted from its PyPI package as on a first run, unless --keep-model-cache), drives Debian's headless
Chromium: open the app, wait for the default model to load, press "Quick start", wait for the en heatmap and then
the fr one. Prints one JSON line of seconds since the app was started. Target (issue 19): heatmap under 180 s.

    flock /tmp/cpu.lock .venv/bin/python bench/bench_first_run.py [--keep-model-cache] [--shots DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser import body, chromium, running_app  # noqa: E402  (the tests' app runner and browser)


def wait(driver, predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate(driver)
        except Exception:  # the page is re-rendering
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep-model-cache", action="store_true",
                        help="reuse the converted built-in model (a second run), instead of an empty cache")
    parser.add_argument("--shots", help="save a screenshot at each step into this folder")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="first-run-")) / "home"
    home.mkdir()
    # The fresh home's own model cache (a first run converts the built-in), or the shared one of earlier runs.
    os.environ["SHRINK_MODEL_CACHE"] = str(Path(os.environ.get("SHRINK_MODEL_CACHE")
                                                or Path.home() / ".cache" / "shrink" / "models")
                                           if args.keep_model_cache else home / "models")
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def mark(step: str, driver=None) -> None:
        seconds[step] = round(time.perf_counter() - started, 1)
        if driver is not None and args.shots:
            Path(args.shots).mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(Path(args.shots) / f"first-run-{len(seconds):02d}-{step}.png"))

    with running_app(home) as url:
        mark("app_up")
        driver = chromium()
        try:
            driver.get(url)
            wait(driver, lambda d: "Model" in body(d), 60, "the Model page")
            mark("page_shown", driver)
            button = wait(driver, lambda d: next((b for b in d.find_elements("tag name", "button")
                                                  if b.text == "Quick start: scan en and fr"), None), 600,
                          "the default model loaded and the Quick start button")
            mark("model_loaded", driver)
            button.click()
            wait(driver, lambda d: "en: w3g64" in body(d) or "en: w4g64" in body(d), 900, "the en heatmap")
            wait(driver, lambda d: d.find_elements("css selector", ".js-plotly-plot"), 60, "the heatmap drawn")
            mark("first_heatmap", driver)
            wait(driver, lambda d: "Slice fr" in body(d) and "(pending)" not in body(d), 900, "the fr heatmap")
            mark("both_slices", driver)
        finally:
            driver.quit()
    load = os.getloadavg()
    print(json.dumps({"bench": "first_run", "seconds_since_app_start": seconds, "target_s": 180,
                      "met": seconds.get("first_heatmap", 1e9) <= 180, "fresh_model_cache": not args.keep_model_cache,
                      "loadavg": [round(x, 2) for x in load], "cpus": os.cpu_count(), "home": str(home)}))


if __name__ == "__main__":
    main()
