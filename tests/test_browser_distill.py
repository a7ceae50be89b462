"""The Distill page in a real browser, on the real SmolLM2 (a third of its blocks dropped, tiny batches): a run starts
from the page, its loss curve moves, it survives a restart of the app and a `kill -9` of its worker (Resume from the
last checkpoint), and the student lands on the Results page's Pareto plots with per-slice figures."""
import os
import re
import signal

from selenium.webdriver.common.keys import Keys

from shrink_core.distill.run import read_run
from shrink_core.evaluation.slices import add_user_records, get_slice, load_rows
from shrink_core.model.describe import describe
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

from .browser import BROWSER_MARKS, body, chromium, free_port, last_job_id, running_app, wait_for, wait_on_job

pytestmark = BROWSER_MARKS
SPEC = "builtin:smollm2-135m"
STEPS, CHECKPOINT_EVERY = 18, 4


def loss_points(driver) -> int:
    """Markers on the first chart of the page (the loss curves: one per logged step and curve)."""
    plots = driver.find_elements("css selector", ".js-plotly-plot")
    return len(plots[0].find_elements("css selector", ".scatterlayer path.point")) if plots else 0


def curve_moves(driver, home, what: str) -> None:
    """The number of plotted points grows between two looks, while the distill job runs (it must not end first)."""
    first = wait_on_job(driver, home, loss_points, f"a loss curve ({what})", kind="distill", rerender_s=30)
    wait_on_job(driver, home, lambda d: loss_points(d) > first, f"the loss curve to move ({what})", kind="distill",
                rerender_s=30)


def logged_steps(store, name: str) -> list[int]:
    run_id = read_run(name)["run_id"]
    return [m["step"] for m in store.metrics(run_id) if m["key"] == "train_loss"] if run_id else [0]


def type_into(driver, label: str, text: str) -> None:
    box = wait_for(driver, lambda d: d.find_element("css selector", f'input[aria-label="{label}"]'), 30, label)
    box.send_keys(Keys.CONTROL, "a")  # React inputs ignore clear(); select and type over
    box.send_keys(text, Keys.ENTER)
    wait_for(driver, lambda d: d.find_element("css selector", f'input[aria-label="{label}"]')
             .get_attribute("value") == text, 30, f"{label} = {text}")


def button(driver, text: str):
    return wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button") if b.text == text), None),
                    60, f"the {text} button")


def configure_and_start(driver, url: str) -> None:
    driver.get(f"{url}/distill")
    wait_for(driver, lambda d: "20 of 30" in body(d), 300, "the projected student (10 of 30 blocks dropped)")
    for label, value in (("Steps", STEPS), ("Batch (sequences)", 2), ("Sequence length", 32)):
        type_into(driver, label, str(value))
    summary = next(e for e in driver.find_elements("css selector", "summary") if "checkpoints" in e.text)
    summary.click()
    type_into(driver, "Checkpoint every N steps", str(CHECKPOINT_EVERY))
    # evaluate on the user's tiny slice only (seconds), not on `en`; each change reruns the page, so one step at a time
    def chooser(d):
        return next(e for e in d.find_elements("css selector", '[data-testid="stMultiSelect"]')
                    if "Evaluate the student" in e.text)

    def chips(d):  # the chosen values: the widget's text after its label (the option list lives elsewhere)
        return [line for line in chooser(d).text.split("\n")[1:] if line.strip() and line != "Choose options"]

    chooser(driver).find_element("css selector", "input").send_keys(Keys.BACKSPACE)
    wait_for(driver, lambda d: chips(d) == [], 30, "en removed")
    chooser(driver).find_element("css selector", "input").send_keys("user_notes")
    wait_for(driver, lambda d: next((o for o in d.find_elements("css selector", '[role="option"]')
                                     if o.text == "user_notes"), None), 30, "the user_notes option").click()
    wait_for(driver, lambda d: chips(d) == ["user_notes"], 30, "user_notes chosen")
    chooser(driver).find_element("css selector", "input").send_keys(Keys.ESCAPE)
    button(driver, "Start distillation").click()


def test_run_starts_moves_survives_restart_and_kill_and_reaches_the_pareto_plot(shrink_home, tmp_path):
    store = Store()
    store.save_model(describe(SPEC))  # the teacher's shape for the page, its size for the Pareto plot
    rows = load_rows(get_slice("toy_en"), split=None)  # a user's own slice: six short paragraphs
    add_user_records([{"text": row["text"]} for row in rows], "notes.jsonl")
    port = free_port()
    driver = chromium()
    try:
        with running_app(shrink_home, port) as url:
            configure_and_start(driver, url)
            curve_moves(driver, shrink_home, "right after Start")
            # the run's state line follows the run: the student's shape, written once it is built, shows without a
            # reload (it said "dropped blocks none; student 0 parameters" for as long as the page stayed open)
            wait_for(driver, lambda d: re.search(r"running; dropped blocks \[[\d, ]+\]; student [1-9][\d,]* parameters",
                                                 body(d)), 30, "the student's shape in the run's state line")
            assert "Traceback" not in body(driver)
            job = jobs.list_jobs(store, "distill")[0]
            assert job.params["config"]["steps"] == STEPS and job.params["slices"] == ["user_notes"]
            assert job.params["config"]["drop_count"] == 10 and job.params["config"]["seq_len"] == 32
        # The app is down; the worker runs in its own session and keeps training.
        assert jobs.get(store, job.id).status == "running"
        name = job.params["name"]
        with running_app(shrink_home, port) as url:
            driver.get(f"{url}/distill")
            curve_moves(driver, shrink_home, "after the app restart")
            assert "running;" in body(driver)

            # kill -9 once a checkpoint is behind it and a few steps past it: Resume picks up from the checkpoint
            wait_on_job(driver, shrink_home, lambda d: (read_run(name)["checkpoint_step"] or 0) >= CHECKPOINT_EVERY
                        and max(logged_steps(store, name)) >= CHECKPOINT_EVERY + 2, "a checkpoint and a few more steps",
                        job_id=job.id, rerender_s=30)
            os.kill(jobs.get(store, job.id).pid, signal.SIGKILL)
            wait_for(driver, lambda d: "stopped at checkpoint step" in body(d) and "died before finishing" in body(d),
                     60, "the page to notice the killed worker")
            before = last_job_id(shrink_home)
            button(driver, "Resume").click()
            wait_on_job(driver, shrink_home, lambda d: "finished;" in body(d), "the resumed run to finish",
                        kind="distill", after=before)
            assert "Traceback" not in body(driver)
            # steps redone after the checkpoint are logged once, and the run kept its own evaluation slice
            assert logged_steps(store, name) == list(range(1, STEPS + 1))
            student_id = next(c["id"] for c in store.candidates() if c["kind"] == "distilled")
            assert [r["slice"] for r in store.results("eval", candidate_id=student_id)] == ["user_notes"]
            driver.save_screenshot(str(tmp_path / "distill-page.png"))

            student = f"distilled {name}"
            driver.get(f"{url}/results")
            labels = lambda d: {e.get_attribute("textContent") for e in  # noqa: E731
                                d.find_elements("css selector", ".js-plotly-plot .scatterlayer .textpoint")}
            wait_for(driver, lambda d: student in labels(d), 120, "the student on the Pareto plot")
            notes = {e.get_attribute("textContent") for e in driver.find_elements("css selector", ".annotation-text")}
            assert not any(student in n for n in notes if "not plotted" in n), notes
            slices_plot = driver.find_elements("css selector", ".js-plotly-plot")[1]
            titles = {e.get_attribute("textContent") for e in slices_plot.find_elements("css selector",
                                                                                      ".annotation-text")}
            legend = {e.get_attribute("textContent") for e in slices_plot.find_elements("css selector", ".legendtext")}
            assert "user_notes" in titles and student in legend
            assert len(slices_plot.find_elements("css selector", ".scatterlayer path.point")) >= 2  # teacher, student
            driver.save_screenshot(str(tmp_path / "results-page.png"))
    finally:
        driver.quit()  # the shrink_home fixture kills a worker a failed test leaves behind
