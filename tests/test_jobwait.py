"""The tests' own job helpers: waiting on a job's state in the store, and killing the workers a test started."""
import os
import signal
import time

import pytest

from shrink_core.results.store import Store
from shrink_core.runtime import jobs

from .jobwait import _worker_alive, kill_workers, wait_job, workers_under

TICK = "shrink_core.runtime.diagnostics:tick_job"


def running(store, job_id):
    deadline = time.time() + 60
    while jobs.get(store, job_id).progress == 0:
        assert time.time() < deadline, "the tick worker never reported progress"
        time.sleep(0.05)
    return jobs.get(store, job_id).pid


def test_wait_job_returns_a_done_job_and_fails_a_failed_one_with_its_error_and_log(shrink_home):
    store = Store()
    done = jobs.submit(store, "tick", TICK, {"steps": 3, "step_seconds": 0.01})
    assert wait_job(shrink_home, done)["status"] == "done"
    failed = jobs.submit(store, "tick", TICK, {"steps": 5, "step_seconds": 0.01, "fail_at": 2})
    with pytest.raises(AssertionError, match=r"(?s)is failed: .*asked to fail at step 2.*tail of its log.*Traceback"):
        wait_job(shrink_home, failed)
    assert wait_job(shrink_home, failed, expect="failed")["status"] == "failed"


def test_wait_job_finds_the_newest_job_of_a_kind_and_ends_on_a_worker_killed_without_a_word(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 500, "step_seconds": 0.05})
    os.kill(running(store, job_id), signal.SIGKILL)
    # nothing reaps it (no page, no jobs.wait): the store still says running, the helper sees the dead pid
    row = wait_job(shrink_home, kind="tick", after=job_id - 1, expect=None)
    assert row["id"] == job_id and row["status"] == "failed" and "died" in row["error"]
    assert jobs.get(store, job_id).status == "running"


def test_kill_workers_stops_only_the_workers_under_its_root(shrink_home, tmp_path, monkeypatch):
    store = Store()
    mine = running(store, jobs.submit(store, "tick", TICK, {"steps": 500, "step_seconds": 0.05}))
    other_home = tmp_path / "other-home"
    monkeypatch.setenv("SHRINK_HOME", str(other_home))
    other_store = Store()
    other = running(other_store, jobs.submit(other_store, "tick", TICK, {"steps": 500, "step_seconds": 0.05}))
    assert workers_under(shrink_home) == [mine] and workers_under(tmp_path) == sorted([mine, other])
    assert kill_workers(shrink_home) == [mine]
    assert not _worker_alive(mine) and _worker_alive(other)
    assert kill_workers(other_home) == [other] and workers_under(tmp_path) == []


def test_wait_on_job_fails_at_once_on_a_failed_job_and_soon_after_a_done_one_the_page_never_shows(shrink_home):
    from .browser import wait_on_job

    store = Store()
    jobs.submit(store, "tick", TICK, {"steps": 5, "step_seconds": 0.01, "fail_at": 2})  # the page finds it by kind
    started = time.time()
    with pytest.raises(AssertionError, match=r"(?s)while waiting for the result: job \d+ \(tick\) is failed: .*"
                                             r"asked to fail at step 2.*Traceback"):
        wait_on_job(None, shrink_home, lambda d: False, "the result", kind="tick")  # no browser: the page never shows
    done = jobs.submit(store, "tick", TICK, {"steps": 2, "step_seconds": 0.01})
    with pytest.raises(AssertionError, match=r"ended done 2 s ago, but the page does not show the result"):
        wait_on_job(None, shrink_home, lambda d: False, "the result", job_id=done, rerender_s=2)
    assert time.time() - started < 60  # judged by the jobs' state, not a deadline
    assert wait_on_job(None, shrink_home, lambda d: "shown", "the result", job_id=done) == "shown"
