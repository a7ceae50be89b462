"""The job runner with real worker processes: progress, results, failure, cancel, and a killed worker."""
import os
import signal
import time

from shrink_core.runtime import jobs
from shrink_core.results.store import Store

TICK = "shrink_core.runtime.diagnostics:tick_job"


def wait_until(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_inline_run_reports_progress(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 4, "step_seconds": 0.0}, spawn=False)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "done" and job.progress == 1.0 and job.result == {"steps": 4}


def test_worker_process_completes_two_jobs_at_once(shrink_home):
    store = Store()
    first = jobs.submit(store, "tick", TICK, {"steps": 5, "step_seconds": 0.05})
    second = jobs.submit(store, "tick", TICK, {"steps": 3, "step_seconds": 0.05})
    assert jobs.wait(store, first, timeout=60).status == "done"
    assert jobs.wait(store, second, timeout=60).result == {"steps": 3}


def test_failure_is_one_sentence_with_log(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 5, "step_seconds": 0.01, "fail_at": 2})
    job = jobs.wait(store, job_id, timeout=60)
    assert job.status == "failed"
    assert "asked to fail at step 2" in job.error and "\n" not in job.error
    assert "Traceback" in jobs.log_path(job_id).read_text()


def test_cancel_stops_a_running_job(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 500, "step_seconds": 0.05})
    wait_until(lambda: jobs.get(store, job_id).progress > 0)
    jobs.cancel(store, job_id)
    job = jobs.wait(store, job_id, timeout=30)
    assert job.status == "cancelled" and job.progress < 1


def test_killed_worker_is_marked_failed_not_running(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 500, "step_seconds": 0.05})
    wait_until(lambda: jobs.get(store, job_id).progress > 0)
    os.kill(jobs.get(store, job_id).pid, signal.SIGKILL)
    job = jobs.wait(store, job_id, timeout=30)
    assert job.status == "failed" and "died" in job.error
    # A fresh process (an app restart) sees the same verdict.
    assert jobs.get(Store(), job_id).status == "failed"


def test_only_library_targets_run(shrink_home):
    import pytest

    with pytest.raises(ValueError, match="shrink_core.module:function"):
        jobs.submit(Store(), "evil", "os:system", {"command": "true"})
