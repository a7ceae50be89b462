"""The job runner with real worker processes: progress, results, failure, cancel, and a killed worker."""
import os
import signal
import time

import pytest

from shrink_core.results.store import Store
from shrink_core.runtime import jobs

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


def test_worker_process_completes_two_jobs_at_once_when_allowed(shrink_home, monkeypatch):
    monkeypatch.setenv("SHRINK_MAX_JOBS", "2")
    store = Store()
    first = jobs.submit(store, "tick", TICK, {"steps": 10, "step_seconds": 0.1})
    second = jobs.submit(store, "tick", TICK, {"steps": 10, "step_seconds": 0.1})
    wait_until(lambda: all(jobs.get(store, j).status == "running" for j in (first, second)))
    assert jobs.wait(store, first, timeout=60).status == "done"
    assert jobs.wait(store, second, timeout=60).status == "done"


def test_only_max_jobs_run_at_once_the_rest_wait_in_order(shrink_home, monkeypatch):
    monkeypatch.delenv("SHRINK_MAX_JOBS", raising=False)  # default: one at a time
    store = Store()
    ids = [jobs.submit(store, "tick", TICK, {"steps": 6, "step_seconds": 0.1}) for _ in range(3)]
    wait_until(lambda: jobs.get(store, ids[0]).status == "running")
    # Queued jobs say so, with their place in the queue (the worker writes it; the UI computes it live).
    assert [jobs.queue_position(store, j) for j in ids] == [None, 1, 2]
    assert "position 2 in the queue; 1 of 1 job slot busy" in jobs.queue_message(store, ids[2])
    wait_until(lambda: "position 1" in jobs.get(store, ids[1]).message)
    most_running = 0
    while any(jobs.get(store, j).active for j in ids):
        jobs.reap(store)
        running = store.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0]
        most_running = max(most_running, running)
        time.sleep(0.05)
    finished = [jobs.get(store, j) for j in ids]
    assert [j.status for j in finished] == ["done"] * 3 and most_running == 1
    assert finished[0].finished <= finished[1].started and finished[1].finished <= finished[2].started


def test_a_queued_job_can_be_cancelled_before_it_starts(shrink_home, monkeypatch):
    monkeypatch.delenv("SHRINK_MAX_JOBS", raising=False)
    store = Store()
    first = jobs.submit(store, "tick", TICK, {"steps": 40, "step_seconds": 0.1})
    second = jobs.submit(store, "tick", TICK, {"steps": 2, "step_seconds": 0.0})
    wait_until(lambda: jobs.get(store, first).status == "running")
    assert jobs.cancel(store, second) is True
    job = jobs.wait(store, second, timeout=30)
    assert job.status == "cancelled" and job.started is None
    assert jobs.cancel(store, second) is False  # nothing left to cancel: the caller sees the no-op
    jobs.cancel(store, first)
    assert jobs.wait(store, first, timeout=30).status == "cancelled"


def test_a_bad_max_jobs_setting_is_one_sentence(shrink_home, monkeypatch):
    import pytest

    from shrink_core.errors import ShrinkError

    monkeypatch.setenv("SHRINK_MAX_JOBS", "lots")
    with pytest.raises(ShrinkError, match="SHRINK_MAX_JOBS must be a whole number of at least 1, got 'lots'"):
        jobs.submit(Store(), "tick", TICK, {}, spawn=False)


def test_an_ended_job_never_flips_back(shrink_home):
    store = Store()
    # Cancelled while queued: the worker that starts late leaves it cancelled and runs nothing.
    job_id = jobs.submit(store, "tick", TICK, {"steps": 2, "step_seconds": 0.0}, spawn=False)
    assert jobs._fail(store, job_id, "cancelled", "Cancelled by the user.") is True
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "cancelled" and job.started is None and job.result is None
    # Failed while running (e.g. presumed hung by the reaper): finishing later does not make it done.
    import threading

    job_id = jobs.submit(store, "tick", TICK, {"steps": 30, "step_seconds": 0.05}, spawn=False)
    runner = threading.Thread(target=jobs.run_job, args=(Store(), job_id), kwargs={"heartbeat": False})
    runner.start()
    wait_until(lambda: jobs.get(store, job_id).progress > 0)
    assert jobs._fail(store, job_id, "failed", "presumed hung") is True
    runner.join(timeout=30)
    job = jobs.get(store, job_id)
    assert job.status == "failed" and job.error == "presumed hung" and job.result is None
    assert jobs._fail(store, job_id, "cancelled", "too late") is False  # the no-op is visible to the caller
    assert jobs.get(store, job_id).status == "failed"


def test_a_reused_pid_is_not_alive(shrink_home, monkeypatch):
    """A job whose recorded worker is gone, its pid now taken by another live worker, is seen as dead."""
    monkeypatch.setenv("SHRINK_MAX_JOBS", "2")
    store = Store()
    other = jobs.submit(store, "tick", TICK, {"steps": 500, "step_seconds": 0.05})
    wait_until(lambda: jobs.get(store, other).status == "running")
    live = jobs.get(store, other)
    orphan = jobs.submit(store, "tick", TICK, {}, spawn=False)
    # The orphan's worker had this pid too, but started 100 s earlier: a different process.
    store.execute("UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, pid = ?, pid_created = ? WHERE id = ?",
                  (time.time(), time.time(), live.pid, live.pid_created - 100, orphan))
    jobs.reap(store)
    assert jobs.get(store, orphan).status == "failed" and "died" in jobs.get(store, orphan).error
    assert jobs.get(store, other).status == "running"  # the same pid with its own create time is alive
    jobs.cancel(store, other)
    assert jobs.wait(store, other, timeout=30).status == "cancelled"


def running_job(store, kind="tick"):
    job_id = jobs.submit(store, kind, TICK, {}, spawn=False)
    assert jobs._claim(store, job_id)
    return job_id


def test_progress_shown_never_goes_backwards(shrink_home):
    store = Store()
    ctx = jobs.JobContext(store, running_job(store))
    ctx.progress(0.84, "scanning")
    ctx.progress(0.70, "scanning")  # e.g. a later stage restarts its own count
    assert jobs.get(store, ctx.job_id).progress == 0.84


def test_eta_comes_from_the_measured_rate_of_the_current_phase(shrink_home):
    store = Store()
    now = [0.0]
    ctx = jobs.JobContext(store, running_job(store), clock=lambda: now[0])
    eta = lambda: jobs.get(store, ctx.job_id).eta_s  # noqa: E731
    ctx.progress(0.0, "loading model")
    now[0] = 102.0  # the load took 102 s and made 5% of the job
    ctx.progress(0.05, "step 1/20")
    assert eta() is None  # a new phase: "estimating" until its own rate is measured
    now[0] = 104.0
    ctx.progress(0.06, "step 1/20")
    assert eta() is None  # two seconds in: not enough to measure
    for k in range(1, 6):  # then 5% a minute
        now[0] = 102.0 + 60 * k
        ctx.progress(0.05 + 0.05 * k, f"step {k + 1}/20")
    # 70% left at 0.05 per 60 s is 840 s (the old guess from the job's start said 938 s)
    assert eta() == pytest.approx(840, rel=1e-6)


def test_log_tail_shows_the_jobs_progress_story(shrink_home):
    store = Store()
    job_id = jobs.submit(store, "tick", TICK, {"steps": 5, "step_seconds": 0.0, "fail_at": 3}, spawn=False)
    job = jobs.run_job(store, job_id, heartbeat=False)
    assert job.status == "failed"
    tail = jobs.log_tail(job_id)
    assert "step 1/5" in tail and tail.count("\n") < jobs.LOG_TAIL_LINES


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_a_hung_worker_is_stopped_not_left_holding_memory(shrink_home, monkeypatch, ignores_sigterm):
    import subprocess
    import sys

    monkeypatch.setattr(jobs, "KILL_GRACE_S", 1.0, raising=False)
    store = Store()
    job_id = running_job(store, kind="distill")
    code = ("import signal, time\n" + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_sigterm else "")
            + "print('ready', flush=True)\ntime.sleep(600)\n")
    worker = subprocess.Popen([sys.executable, "-c", code], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert worker.stdout.readline().strip() == b"ready"
        pid, created = jobs._process_identity(worker.pid)
        store.execute("UPDATE jobs SET pid = ?, pid_created = ?, heartbeat = ? WHERE id = ?",
                      (pid, created, time.time() - 60, job_id))
        jobs.reap(store)
        assert worker.wait(timeout=15) is not None  # its process group was stopped
        job = jobs.get(store, job_id)
        assert job.status == "failed" and "presumed hung" in job.error
        assert ("SIGKILL" if ignores_sigterm else "SIGTERM") in job.error
        assert "Resume" in job.error  # a distill run continues from its checkpoint
    finally:
        if worker.poll() is None:
            worker.kill()
