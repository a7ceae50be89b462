"""Tests wait on a job's state in the store, not on a clock, and clean up the workers they started.

Plain SQL on the `jobs` table of `$SHRINK_HOME/shrink.db` (see shrink_core/results/store.py), so these helpers do not
depend on the jobs module's API. A worker runs as `python -m shrink_core.runtime.worker JOB_ID STORE_PATH` in its own
session (process group = its pid), which is how the cleanup finds and stops it.
"""
from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

ENDED = ("done", "failed", "cancelled")
HANG_S = 20 * 60  # a deadline that only catches hangs: no job in this suite takes anywhere near this long
WORKER_MODULE = b"shrink_core.runtime.worker"


def store_path(home) -> Path:
    return Path(home) / "shrink.db"


def job_rows(home, kind: str | None = None) -> list[dict]:
    """Every job in the store under `home`, newest first (none if there is no store yet)."""
    path = store_path(home)
    if not path.exists():
        return []
    db = sqlite3.connect(path, timeout=30)  # a plain reader: the store is in WAL mode, so it never blocks a writer
    try:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM jobs" + (" WHERE kind = ?" if kind else "") + " ORDER BY id DESC",
                          (kind,) if kind else ()).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):  # the store is being created
            return []
        raise
    finally:
        db.close()
    return [dict(row) for row in rows]


def job_row(home, job_id: int) -> dict | None:
    return next((row for row in job_rows(home) if row["id"] == job_id), None)


def find_job(home, job_id: int | None, kind: str | None, after: int) -> dict | None:
    """The job `job_id`, or else the newest job of `kind` above id `after` (one a page submits); None until it exists."""
    if job_id is not None:
        return job_row(home, job_id)
    rows = [r for r in job_rows(home, kind) if r["id"] > after]
    return rows[0] if rows else None


def log_tail(home, job_id: int, lines: int = 40) -> str:
    path = Path(home) / "logs" / f"job-{job_id}.log"
    if not path.exists():
        return "(no job log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def describe_job(home, row: dict) -> str:
    return (f"job {row['id']} ({row['kind']}) is {row['status']}: {row['error'] or row['message']!r}\n"
            f"--- tail of its log ---\n{log_tail(home, row['id'])}")


def _worker_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            if handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                return False
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return WORKER_MODULE in handle.read()
    except (OSError, IndexError):
        return False


def wait_job(home, job_id: int | None = None, *, kind: str | None = None, after: int = 0, expect: str | None = "done",
             timeout: float = HANG_S, poll: float = 0.5) -> dict:
    """Block until a job ends; returns its row. Without `job_id`, the newest job of `kind` with an id above `after`
    (a job a page submits) once it appears. With `expect`, a job that ended otherwise fails the test with its error
    and log tail. A worker that died without writing its end (killed) ends the wait too, as failed."""
    deadline = time.time() + timeout
    dead_since = None
    while True:
        row = find_job(home, job_id, kind, after)
        if row is not None and row["status"] in ENDED:
            break
        if row is not None and row["pid"] and not _worker_alive(row["pid"]):
            dead_since = dead_since or time.time()
            if time.time() - dead_since > 5:  # its final write had time to land; it died without one
                row = {**row, "status": "failed", "error": f"worker pid {row['pid']} died before finishing"}
                break
        else:
            dead_since = None
        if time.time() > deadline:
            what = describe_job(home, row) if row else f"no {kind or 'such'} job appeared in {store_path(home)}"
            raise AssertionError(f"no job ended within {timeout:.0f} s (a hang?): {what}")
        time.sleep(poll)
    if expect and row["status"] != expect:
        raise AssertionError(f"expected the job to end {expect}, but {describe_job(home, row)}")
    return row


def workers_under(root) -> list[int]:
    """Pids of live job workers whose store lies under `root` (read from their command line)."""
    root = os.path.realpath(root)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                argv = handle.read().split(b"\0")
        except OSError:
            continue
        if WORKER_MODULE not in argv or not _worker_alive(int(entry)):
            continue
        store = os.fsdecode(argv[argv.index(WORKER_MODULE) + 2]) if len(argv) > argv.index(WORKER_MODULE) + 2 else ""
        if store and (os.path.realpath(store) + os.sep).startswith(root + os.sep):
            found.append(int(entry))
    return sorted(found)


def kill_workers(root) -> list[int]:
    """SIGKILL the process group of every job worker whose store lies under `root`; returns the pids it found."""
    pids = workers_under(root)
    for pid in pids:
        for kill in (os.killpg, os.kill):  # the worker leads its own group; fall back to the pid alone
            try:
                kill(pid, signal.SIGKILL)
                break
            except (ProcessLookupError, PermissionError):
                continue
    deadline = time.time() + 10
    while time.time() < deadline and any(_worker_alive(pid) for pid in pids):
        time.sleep(0.1)
    return pids
