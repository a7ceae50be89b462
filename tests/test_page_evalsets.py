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
