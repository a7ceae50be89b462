"""The Plan page in a real browser (issue 6, done when): protect two blocks, set a budget, run the planner, run the
plan, and see predicted vs measured per slice."""
import os

from shrink_core.plan import load_plan

from .browser import BROWSER_MARKS, body, chromium, last_job_id, running_app, wait_for, wait_on_job

pytestmark = BROWSER_MARKS
SPEC = "builtin:smollm2-135m"


def rules(driver) -> str:
    return driver.find_element("css selector", "textarea").get_attribute("value")


def button(driver, text: str):
    return wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button") if b.text == text), None),
                    30, f"the {text} button")


def click(driver, element) -> None:
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    element.click()


def test_protect_budget_plan_run_and_compare(scanned_home, tmp_path):
    from selenium.webdriver.common.keys import Keys

    # what the Model, Eval sets and Sensitivity pages would have stored: the inventory, a user's slice of three short
    # notes and a small real fast scan of it (two settings, quick depth), so the page has scores to predict from and
    # to plan with; made once per session. The plan run evaluates the scanned slice (the run's default).
    home = scanned_home
    with running_app(home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/plan")
            wait_for(driver, lambda d: "Per module" in body(d) and "Run planner" in body(d), 300, "the Plan page")
            # protect blocks 0 and 1: bulk edit, all block linears (the default kinds), blocks 0-1, setting keep
            expander = next(e for e in driver.find_elements("css selector", "summary") if "Bulk edit" in e.text)
            click(driver, expander)
            end = 'input[type="range"][aria-label="Blocks — end"]'  # the slider thumb's keyboard twin
            high = wait_for(driver, lambda d: d.find_element("css selector", end), 30, "the slider's end thumb")
            driver.execute_script("arguments[0].focus();", high)
            for _ in range(28):  # 29 -> 1
                high.send_keys(Keys.ARROW_LEFT)
            wait_for(driver, lambda d: d.find_element("css selector", end).get_attribute("value") == "1", 30,
                     "blocks 0-1 on the slider")
            setting = next(e for e in driver.find_elements("css selector", '[data-testid="stSelectbox"]')
                           if e.text.split("\n")[0] == "Setting")  # "(no change)" until chosen: Apply is disabled
            setting.find_element("css selector", "input").send_keys("keep")
            wait_for(driver, lambda d: next((o for o in d.find_elements("css selector", '[role="option"]')
                                             if o.text == "keep"), None), 30, "the keep option").click()
            wait_for(driver, lambda d: button(d, "Apply").is_enabled(), 30, "Apply enabled")
            click(driver, button(driver, "Apply"))
            wait_for(driver, lambda d: "keep: true" in rules(d) and "blocks: [0, 1]" in rules(d), 60,
                     "a keep rule for blocks 0-1")
            # a budget: 200 MB packed (the two protected blocks stay fp32), then the planner
            box = driver.find_element("css selector", 'input[aria-label="Value"]')
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys("200", Keys.ENTER)
            wait_for(driver, lambda d: d.find_element("css selector", 'input[aria-label="Value"]')
                     .get_attribute("value").startswith("200"), 30, "the budget value")
            click(driver, button(driver, "Run planner"))
            text = wait_for(driver, lambda d: next((line for line in body(d).splitlines()
                                                    if line.startswith("Planner: optimal")), None), 180, "the planner")
            megabytes = float(text.split(" MB")[0].split()[-1].replace(",", ""))
            assert megabytes <= 200
            plan = rules(driver)
            assert "planner: keep" in plan and "planner: w" in plan and "|" not in plan  # rules by kind and blocks
            kept = next(r for r in load_plan(plan).rules if r.note == "planner: keep" and "down" in (r.kind or ()))
            assert kept.keep and {0, 1} <= set(kept.blocks)  # protected blocks 0-1: kept by the planner's rule
            # run the plan (a background job: apply, evaluate user_notes at the fast protocol), then predicted vs measured
            before = last_job_id(home)
            click(driver, button(driver, "Run this plan"))
            wait_on_job(driver, home, lambda d: "stored as a candidate" in body(d).lower(), "the plan run's result", kind="eval",
                        after=before)
            # the compare table's grid fills its header cells after its first draw, a moment after the caption
            # beside it is there: wait for them rather than read them once (CI caught the race under load)
            def compare_grid(d):
                return next((g for g in d.find_elements("css selector", '[data-testid="stDataFrame"]')
                             if {"predicted ΔNLL", "measured ΔNLL"} <= {h.get_attribute("textContent") for h in
                                                                       g.find_elements("css selector",
                                                                                       '[role="columnheader"]')}),
                            None)

            grid = wait_for(driver, compare_grid, 60, "the predicted-vs-measured table's headers")
            cells = [c.get_attribute("textContent") for c in grid.find_elements("css selector", '[role="gridcell"]')]
            assert "user_notes" in cells
            # in the compare table, the user_notes row carries a prediction (every changed block linear was scored)
            names = [h.get_attribute("textContent") for h in grid.find_elements("css selector", '[role="columnheader"]')]
            rows = [[c.get_attribute("textContent") for c in r.find_elements("css selector", '[role="gridcell"]')]
                    for r in grid.find_elements("css selector", '[role="row"]')]
            notes = next(r for r in rows if "user_notes" in r)
            offset = len(names) - len(notes)  # header cells of columns the rows do not repeat (an index, if any)
            assert float(notes[names.index("predicted ΔNLL") - offset]) > 0, (names, notes)
            assert "Traceback" not in body(driver)
            driver.save_screenshot(os.path.join(tmp_path, "plan.png"))
        finally:
            driver.quit()


def test_closed_loop_rounds_on_calibration_rows_then_the_kept_plan_at_the_protocol(scanned_home, tmp_path):
    """The Plan page's closed loop, as a user runs it: one round and one local step measured on the calibration
    rows, then the kept plan run at the protocol; the table shows each with its kind and the caption says where
    each figure was measured."""
    from selenium.webdriver.common.keys import Keys

    home = scanned_home
    with running_app(home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/plan")
            wait_for(driver, lambda d: "Plan, run, refit (closed loop)" in body(d), 300, "the Plan page's loop")
            for label in ("Closed-loop rounds", "Local steps"):  # the page may still be drawing its inputs
                box = wait_for(driver, lambda d, label=label: d.find_element(
                    "css selector", f'input[aria-label="{label}"]'), 60, f"the {label} input")
                click(driver, box)
                box.send_keys(Keys.CONTROL, "a")
                box.send_keys("1", Keys.ENTER)
                wait_for(driver, lambda d, label=label: d.find_element(
                    "css selector", f'input[aria-label="{label}"]').get_attribute("value") == "1", 30, label)
            before = last_job_id(home)
            click(driver, button(driver, "Plan, run, refit (closed loop)"))
            caption = wait_on_job(driver, home, lambda d: next((line for line in body(d).splitlines()
                                                                if "The kept plan" in line), None),
                                  "the loop's result", kind="plan_loop", after=before)
            assert "KL on the calibration rows of each scored slice" in caption and "stored as a candidate" in caption
            grid = wait_for(driver, lambda d: next((g for g in d.find_elements("css selector", '[data-testid="stDataFrame"]')
                                                    if "verified" in g.get_attribute("textContent")), None),
                            60, "the loop's table with its verified row")
            text = grid.get_attribute("textContent")
            assert "fitted" in text and "uniform w" in text and "closed loop result" in text  # the baseline row
            assert "Traceback" not in body(driver)
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", grid)
            driver.save_screenshot(os.path.join(tmp_path, "loop.png"))
        finally:
            driver.quit()
