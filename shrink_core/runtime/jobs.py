"""Background jobs: long work runs in a worker process; state and progress live in the store.

A job names its work as "shrink_core.module:function"; the function is called as `function(ctx, **params)`
and returns a JSON-able dict. The worker survives a browser reload or an app restart. A worker that dies is
noticed by `reap` (dead pid or stale heartbeat) and its job marked failed with the reason.
"""
from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

from shrink_core.errors import JobCancelled, ShrinkError
from shrink_core.paths import REPO_ROOT, shrink_home
from shrink_core.results.store import Store

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0  # no heartbeat for this long while "running" means the worker is gone
CANCEL_GRACE_S = 10.0  # after this, a cancelled worker that has not stopped by itself is terminated
ACTIVE = ("queued", "running")
_children: list[subprocess.Popen] = []  # kept so finished workers are reaped, not left as zombies


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    target: str
    params: dict
    status: str
    progress: float
    message: str
    eta_s: float | None
    pid: int | None
    error: str | None
    result: dict | None
    created: float
    started: float | None
    finished: float | None
    cancel_requested: float | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @staticmethod
    def from_row(row) -> "Job":
        return Job(
            id=row["id"],
            kind=row["kind"],
            target=row["target"],
            params=json.loads(row["params_json"]),
            status=row["status"],
            progress=row["progress"],
            message=row["message"],
            eta_s=row["eta_s"],
            pid=row["pid"],
            error=row["error"],
            result=json.loads(row["result_json"]) if row["result_json"] else None,
            created=row["created"],
            started=row["started"],
            finished=row["finished"],
            cancel_requested=row["cancel_requested"],
        )


def log_path(job_id: int):
    path = shrink_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"job-{job_id}.log"


def _check_target(target: str) -> None:
    module, _, function = target.partition(":")
    if not module.startswith("shrink_core.") or not function.isidentifier():
        raise ValueError(f"job target must be 'shrink_core.module:function', got {target!r}")


def submit(store: Store, kind: str, target: str, params: dict, *, spawn: bool = True) -> int:
    """Queue a job and start its worker process; returns the job id."""
    _check_target(target)
    cursor = store.execute(
        "INSERT INTO jobs (kind, target, params_json, status, created) VALUES (?, ?, ?, 'queued', ?)",
        (kind, target, json.dumps(params), time.time()),
    )
    job_id = cursor.lastrowid
    if spawn:
        env = dict(os.environ, SHRINK_HOME=str(shrink_home()), PYTHONPATH=str(REPO_ROOT))
        with open(log_path(job_id), "ab") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", "shrink_core.runtime.worker", str(job_id), str(store.path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=str(REPO_ROOT),
                start_new_session=True,  # its own process group: cancel can stop it and its children
            )
        _children.append(child)
        store.execute("UPDATE jobs SET pid = ? WHERE id = ? AND pid IS NULL", (child.pid, job_id))
    return job_id


def get(store: Store, job_id: int) -> Job | None:
    row = store.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return Job.from_row(row) if row else None


def list_jobs(store: Store, kind: str | None = None, limit: int = 50) -> list[Job]:
    reap(store)
    if kind:
        rows = store.execute("SELECT * FROM jobs WHERE kind = ? ORDER BY id DESC LIMIT ?", (kind, limit))
    else:
        rows = store.execute("SELECT * FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
    return [Job.from_row(r) for r in rows]


def cancel(store: Store, job_id: int) -> None:
    """Ask a job to stop; the worker notices at its next progress call, or is terminated after a grace period."""
    store.execute(
        "UPDATE jobs SET cancel_requested = ? WHERE id = ? AND status IN ('queued', 'running') AND cancel_requested IS NULL",
        (time.time(), job_id),
    )
    reap(store)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        if fields[0] in ("Z", "X"):  # a zombie has finished; it only waits for its parent
            return False
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"shrink_core.runtime.worker" in handle.read()  # a recycled pid is not our worker
    except (OSError, IndexError):
        return False


def _fail(store: Store, job_id: int, status: str, reason: str) -> None:
    store.execute(
        "UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ? AND status IN ('queued', 'running')",
        (status, reason, time.time(), job_id),
    )


def reap(store: Store) -> None:
    """Mark jobs whose worker is gone as failed, and stop cancelled workers that overstay their grace period."""
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)
    now = time.time()
    for row in store.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running')").fetchall():
        job = Job.from_row(row)
        if job.cancel_requested and now - job.cancel_requested > CANCEL_GRACE_S:
            if job.pid and _alive(job.pid):
                try:
                    os.killpg(job.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            _fail(store, job.id, "cancelled", "Cancelled by the user (the worker was stopped).")
            continue
        if job.pid is None:
            if now - job.created > STALE_AFTER_S:
                _fail(store, job.id, "failed", "The worker process never started; see the job log.")
            continue
        heartbeat = row["heartbeat"] or job.created
        if not _alive(job.pid):
            # The worker writes its final status itself; re-read in case it finished since our SELECT.
            fresh = get(store, job.id)
            if fresh and fresh.active:
                _fail(store, job.id, "failed", f"The worker process (pid {job.pid}) died before finishing; see "
                                               f"{log_path(job.id)}.")
        elif now - heartbeat > STALE_AFTER_S and job.status == "running":
            _fail(store, job.id, "failed", f"The worker stopped reporting for {now - heartbeat:.0f} s and was presumed hung.")


class JobContext:
    """What a job function gets: progress reporting with ETA, cancellation, and the store."""

    def __init__(self, store: Store, job_id: int):
        self.store = store
        self.job_id = job_id
        self._started = time.time()

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; raises JobCancelled if the user cancelled."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        elapsed = time.time() - self._started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.02 else None
        self.store.execute(
            "UPDATE jobs SET progress = ?, message = ?, eta_s = ?, heartbeat = ? WHERE id = ?",
            (fraction, message, eta, time.time(), self.job_id),
        )
        self.check_cancel()

    def check_cancel(self) -> None:
        row = self.store.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (self.job_id,)).fetchone()
        if row and row["cancel_requested"]:
            raise JobCancelled()


def _heartbeat(store_path: str, job_id: int, stop: threading.Event) -> None:
    store = Store(store_path)  # own connection: sqlite connections are not shared across threads here
    while not stop.wait(HEARTBEAT_S):
        store.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time(), job_id))
    store.close()


def run_job(store: Store, job_id: int, heartbeat: bool = True) -> Job:
    """Run a queued job in this process (the worker's body; tests call it inline)."""
    row = store.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    job = Job.from_row(row)
    store.execute(
        "UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, pid = ? WHERE id = ?",
        (time.time(), time.time(), os.getpid(), job_id),
    )
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(str(store.path), job_id, stop), daemon=True)
    if heartbeat:
        beat.start()
    ctx = JobContext(store, job_id)
    try:
        module_name, function_name = job.target.split(":")
        function = getattr(importlib.import_module(module_name), function_name)
        ctx.check_cancel()
        result = function(ctx, **job.params)
        store.execute(
            "UPDATE jobs SET status = 'done', progress = 1, message = 'done', eta_s = 0, result_json = ?, finished = ?"
            " WHERE id = ?",
            (json.dumps(result or {}, default=str), time.time(), job_id),
        )
    except JobCancelled:
        _fail(store, job_id, "cancelled", "Cancelled by the user.")
    except ShrinkError as exc:
        _fail(store, job_id, "failed", str(exc))
    except Exception as exc:  # the job's own bug: keep the traceback in the log, one line in the UI
        traceback.print_exc()
        _fail(store, job_id, "failed", f"Internal error ({type(exc).__name__}: {exc}); the traceback is in {log_path(job_id)}.")
    finally:
        stop.set()
    return get(store, job_id)


def wait(store: Store, job_id: int, timeout: float = 600, poll: float = 0.5) -> Job:
    """Block until a job ends (for the CLI and tests)."""
    deadline = time.time() + timeout
    while True:
        reap(store)
        job = get(store, job_id)
        if not job.active or time.time() > deadline:
            return job
        time.sleep(poll)
