"""The job panel's outcome with AppTest: a failed job's "Show details" shows the last lines of its log."""
from streamlit.testing.v1 import AppTest

from shrink_core.results.store import Store
from shrink_core.runtime import jobs


def outcome(job_id):
    from ui.jobs import job_outcome

    job_outcome(job_id)


def test_show_details_shows_the_jobs_progress_from_its_log(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", "shrink_core.runtime.diagnostics:tick_job",
                         {"steps": 5, "step_seconds": 0.0, "fail_at": 3}, spawn=False)
    assert jobs.run_job(store, job_id, heartbeat=False).status == "failed"
    at = AppTest.from_function(outcome, args=(job_id,), default_timeout=30).run()
    assert any("asked to fail at step 3" in e.value for e in at.error)
    at.toggle(key=f"details-{job_id}").set_value(True).run()
    assert not at.exception
    shown = at.code[0].value
    assert "step 1/5" in shown  # where the job got to, not only its first message
