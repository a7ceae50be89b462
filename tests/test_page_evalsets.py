"""The Eval sets page with AppTest: the slice table, and stored baseline results with intervals."""
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from shrink_core.paths import REPO_ROOT
from shrink_core.results.store import Store
from shrink_core.runtime import jobs

PAGE = str(REPO_ROOT / "app_pages" / "evalsets.py")


def test_lists_slices_and_invites_a_baseline(shrink_home):
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value
    assert {"en", "fr", "zh", "code", "arc"} <= set(table["id"])
    assert any("No baseline results" in i.value for i in at.info)


@pytest.mark.integration
def test_baseline_job_results_show_with_intervals(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "eval", "shrink_core.results.eval_run:eval_job",
                         {"spec": "builtin:smollm2-135m", "slices": ["toy_en", "toy_mc"], "budget": "fast"}, spawn=False)
    assert jobs.run_job(store, job_id, heartbeat=False).status == "done"
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    assert not at.exception
    shown = at.dataframe[1].value
    assert set(shown["slice"]) == {"toy_en", "toy_mc"}
    row = shown[shown["slice"] == "toy_en"].iloc[0]
    assert row["tokens"] > 0 and row["ppl"] > 1
    # toy_en has 4 rows: too few for an interval, and the table says so where it would have been
    assert pd.isna(row["ppl_low"]) and row["interval"] == "n=4 items: too few for an interval (fewer than 20)"
    assert any("bootstrap" in c.value and "Measured on cpu" in c.value for c in at.caption)


def test_slice_peek_shows_rows_as_text_with_their_line_breaks(shrink_home):
    from shrink_core.evaluation.slices import list_slices, load_rows

    first = load_rows(next(s for s in list_slices() if s.id == "arc"), "eval")[0]
    assert "\n" in first["context"]  # the case at stake: a multi-line field
    at = AppTest.from_file(PAGE, default_timeout=60).run()
    at.selectbox(key="peek_slice").set_value("arc").run()
    assert not at.exception
    assert not at.json  # no raw JSON with \n escapes
    shown = [t.value for t in at.text]
    assert first["context"] in shown  # the real line break, not the two characters \ and n
    assert any(first["choices"][first["answer"]].strip() in t for t in shown)


@pytest.mark.integration
def test_a_running_baseline_shows_its_finished_slices_and_marks_the_rest_pending(shrink_home):
    """What the page shows mid-job: the slice stored so far as a row, the others as pending rows, the progress text
    saying how many are done; no "No baseline results" while a slice is already in."""
    import time

    from shrink_core.results.eval_run import run_eval

    store = Store()
    run_eval("builtin:smollm2-135m", ["toy_en"], "fast", store=store)  # the first part, as the job stored it
    job_id = jobs.submit(store, "eval", "shrink_core.results.eval_run:eval_job",
                         {"spec": "builtin:smollm2-135m", "slices": ["toy_en", "toy_mc", "toy_exact"],
                          "budget": "fast"}, spawn=False)
    me, created = jobs._process_identity()  # stands for the live worker
    store.execute("UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, pid = ?, pid_created = ?, "
                  "parts_total = 3, parts_json = '[\"toy_en\"]' WHERE id = ?",
                  (time.time(), time.time(), me, created, job_id))
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["job:eval"] = job_id
    at.run()
    assert not at.exception, at.exception
    shown = at.dataframe[1].value
    assert dict(zip(shown["slice"], shown["status"])) == {"toy_en": "done", "toy_mc": "pending", "toy_exact": "pending"}
    assert shown[shown["slice"] == "toy_en"].iloc[0]["ppl"] > 1
    texts = [p.proto.text for p in at.get("progress")]
    assert any("1 of 3 slices done (toy_en)" in t for t in texts), texts
    assert not any("No baseline results" in i.value for i in at.info)
