"""Background jobs: long work runs in a worker process; state and progress live in the store.

A job names its work as "shrink_core.module:function"; the function is called as `function(ctx, **params)`
and returns a JSON-able dict. The worker survives a browser reload or an app restart. A worker that dies is
noticed by `reap` (dead pid or stale heartbeat) and its job marked failed with the reason.

Status moves one way, guarded in SQL: queued -> running -> done, and queued/running -> failed/cancelled; an update
whose previous state does not match changes nothing and says so (returns False). At most `max_jobs()` jobs run at
once (each loads a model); the others stay queued, in order, and their worker starts the work when a slot frees.
A worker is known by its pid and its process create time, so a pid reused by another process is not "alive".
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

import psutil

from shrink_core.errors import JobCancelled, ShrinkError
from shrink_core.paths import REPO_ROOT, shrink_home
from shrink_core.results.store import Store

HEARTBEAT_S = 2.0
STALE_AFTER_S = 30.0  # no heartbeat for this long while "running" means the worker is gone
CANCEL_GRACE_S = 10.0  # after this, a cancelled worker that has not stopped by itself is terminated
KILL_GRACE_S = 5.0  # after SIGTERM, a process group still alive this long gets SIGKILL
RESUMABLE_KINDS = {"distill": "press Resume on the Distill page to continue from its last checkpoint"}
LOG_TAIL_LINES = 40
LOG_EVERY_S = 10.0  # progress messages of one phase are written to the job's log at most this often
ETA_MIN_PHASE_FRACTION = 0.05  # of the phase's remaining work done before an ETA is shown
ETA_MIN_PHASE_S = 5.0  # and at least this long into the phase
ETA_SMOOTHING = 0.3  # weight of the newest rate in the exponential average
ACTIVE = ("queued", "running")
QUEUE_POLL_S = 0.5  # how often a queued worker looks for a free slot
MAX_JOBS_ENV = "SHRINK_MAX_JOBS"
# Which states each status may be entered from; anything else is a no-op.
ALLOWED_FROM = {"running": ("queued",), "done": ("running",), "failed": ACTIVE, "cancelled": ACTIVE}
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
    pid_created: float | None = None
    parts: tuple[str, ...] = ()  # the parts (slices, candidates) finished and stored so far, in order
    parts_total: int | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def parts_text(self, noun: str = "parts") -> str:
        """"2 of 5 slices done (en, fr)", or "" for a job that does not report parts."""
        if not self.parts_total:
            return ""
        done = f" ({', '.join(self.parts)})" if self.parts else ""
        return f"{len(self.parts)} of {self.parts_total} {noun} done{done}"

    @staticmethod
    def from_row(row) -> Job:
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
            pid_created=row["pid_created"],
            parts=tuple(json.loads(row["parts_json"] or "[]")),
            parts_total=row["parts_total"],
        )


def max_jobs() -> int:
    """How many jobs may run at once (each loads a model): $SHRINK_MAX_JOBS, default 1."""
    raw = os.environ.get(MAX_JOBS_ENV, "1")
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ShrinkError(f"{MAX_JOBS_ENV} must be a whole number of at least 1, got {raw!r}.")
    return value


def queue_position(store: Store, job_id: int) -> int | None:
    """1 for the next queued job to start, 2 for the one after...; None when the job is not queued."""
    row = store.execute(
        "SELECT (SELECT COUNT(*) FROM jobs AS q WHERE q.status = 'queued' AND q.id < jobs.id) + 1 AS position"
        " FROM jobs WHERE id = ? AND status = 'queued'", (job_id,)).fetchone()
    return row["position"] if row else None


def queue_message(store: Store, job_id: int) -> str:
    """What a queued job waits for, in one sentence (shown by the UI and written by the waiting worker)."""
    position = queue_position(store, job_id)
    if position is None:
        return ""
    cap = max_jobs()
    running = store.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running'").fetchone()[0]
    return (f"Queued: position {position} in the queue; {running} of {cap} job slot{'s' if cap != 1 else ''} busy "
            f"(set {MAX_JOBS_ENV} to run more at once).")


def _transition(store: Store, job_id: int, status: str, **fields) -> bool:
    """Move a job to `status` if its current status allows it; True if it moved, False if it was a no-op."""
    allowed = ALLOWED_FROM[status]
    sets = ", ".join(["status = ?"] + [f"{key} = ?" for key in fields])
    cursor = store.execute(
        f"UPDATE jobs SET {sets} WHERE id = ? AND status IN ({', '.join('?' for _ in allowed)})",
        (status, *fields.values(), job_id, *allowed),
    )
    return cursor.rowcount == 1


def _process_identity(pid: int | None = None) -> tuple[int, float | None]:
    """(pid, create time) of a process; the create time is None if the process is already gone."""
    pid = os.getpid() if pid is None else pid
    try:
        return pid, psutil.Process(pid).create_time()
    except psutil.Error:
        return pid, None


def _claim(store: Store, job_id: int) -> bool:
    """queued -> running for this process, only if a slot is free and no older job is still queued (one statement)."""
    pid, created = _process_identity()
    now = time.time()
    cursor = store.execute(
        """UPDATE jobs SET status = 'running', started = ?, heartbeat = ?, pid = ?, pid_created = ?, message = 'starting'
           WHERE id = ? AND status = 'queued' AND cancel_requested IS NULL
             AND (SELECT COUNT(*) FROM jobs WHERE status = 'running') < ?
             AND NOT EXISTS (SELECT 1 FROM jobs AS older WHERE older.status = 'queued' AND older.id < ?)""",
        (now, now, pid, created, job_id, max_jobs(), job_id),
    )
    return cursor.rowcount == 1


def log_path(job_id: int):
    path = shrink_home() / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path / f"job-{job_id}.log"


def _check_target(target: str) -> None:
    module, _, function = target.partition(":")
    if not module.startswith("shrink_core.") or not function.isidentifier():
        raise ValueError(f"job target must be 'shrink_core.module:function', got {target!r}")


def submit(store: Store, kind: str, target: str, params: dict, *, spawn: bool = True) -> int:
    """Queue a job and start its worker process (which waits for a free slot); returns the job id."""
    _check_target(target)
    max_jobs()  # a bad $SHRINK_MAX_JOBS is the user's one sentence now, not a failed job later
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
        pid, created = _process_identity(child.pid)
        store.execute("UPDATE jobs SET pid = ?, pid_created = ? WHERE id = ? AND pid IS NULL", (pid, created, job_id))
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


def cancel(store: Store, job_id: int) -> bool:
    """Ask a job to stop; the worker notices at its next progress call, or is terminated after a grace period.

    False when there was nothing to cancel (the job already ended, or was already asked to stop)."""
    cursor = store.execute(
        "UPDATE jobs SET cancel_requested = ? WHERE id = ? AND status IN ('queued', 'running') AND cancel_requested IS NULL",
        (time.time(), job_id),
    )
    reap(store)
    return cursor.rowcount == 1


PID_TIME_TOLERANCE_S = 1.0  # create times are read in different processes; a reused pid starts later than this


def _alive(pid: int, created: float | None) -> bool:
    """Whether `pid` is still the process that was recorded (same create time), and has not finished."""
    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):  # finished; only waits for its parent
            return False
        return created is None or abs(process.create_time() - created) <= PID_TIME_TOLERANCE_S
    except psutil.Error:  # gone, or someone else's process
        return False


def _fail(store: Store, job_id: int, status: str, reason: str) -> bool:
    """Mark an active job failed or cancelled; False (a no-op) when it had already ended."""
    return _transition(store, job_id, status, error=reason, finished=time.time())


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except ProcessLookupError:  # gone already (or, for a group, no member left)
        pass


def stop_process_group(pid: int, created: float | None, grace: float | None = None) -> str:
    """SIGTERM the worker's process group (a worker leads its own), then SIGKILL whatever is left of it after
    `grace` seconds, children included; says what it did."""
    if pid == os.getpid() or os.getpgid(0) == pid:  # a job run inline (tests): never stop this process
        return "it ran inside this process, which was left running"
    if not _alive(pid, created):
        return f"its process (pid {pid}) had already exited"
    try:
        group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return f"its process (pid {pid}) had already exited"
    _signal(pid, signal.SIGTERM, group)
    grace = KILL_GRACE_S if grace is None else grace
    deadline = time.time() + grace
    while time.time() < deadline:
        if not _alive(pid, created):
            if group:  # a child that outlived its parent would still hold memory
                _signal(pid, signal.SIGKILL, group)
            return f"its process group (pid {pid}) was stopped with SIGTERM"
        time.sleep(0.1)
    _signal(pid, signal.SIGKILL, group)
    return f"its process group (pid {pid}) did not stop on SIGTERM within {grace:.0f} s and was killed (SIGKILL)"


def resume_hint(kind: str) -> str:
    """How the user continues a job of this kind after it was stopped, or "" where it cannot resume."""
    hint = RESUMABLE_KINDS.get(kind)
    return f" It can resume: {hint}." if hint else ""


def log_tail(job_id: int, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a job's log (its progress messages, warnings and any traceback)."""
    path = log_path(job_id)
    if not path.exists():
        return "(no log yet)"
    text = path.read_text(errors="replace").rstrip("\n")
    return "\n".join(text.splitlines()[-lines:]) if text else "(the log is empty)"


def reap(store: Store) -> None:
    """Mark jobs whose worker is gone as failed, and stop cancelled workers that overstay their grace period."""
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)
    now = time.time()
    for row in store.execute("SELECT * FROM jobs WHERE status IN ('queued', 'running')").fetchall():
        job = Job.from_row(row)
        if job.cancel_requested and now - job.cancel_requested > CANCEL_GRACE_S:
            if job.pid and _alive(job.pid, job.pid_created):
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
        if not _alive(job.pid, job.pid_created):
            # The worker writes its final status itself; re-read in case it finished since our SELECT.
            fresh = get(store, job.id)
            if fresh and fresh.active:
                _fail(store, job.id, "failed", f"The worker process (pid {job.pid}) died before finishing; see "
                                               f"{log_path(job.id)}.")
        elif now - heartbeat > STALE_AFTER_S and job.status == "running":
            silent = now - heartbeat
            if _fail(store, job.id, "failed", f"The worker stopped reporting for {silent:.0f} s and was presumed hung."):
                # Marked failed first (it no longer holds a slot); then free its memory and record how.
                stopped = stop_process_group(job.pid, job.pid_created)
                store.execute("UPDATE jobs SET error = ? WHERE id = ?", (
                    f"The worker stopped reporting for {silent:.0f} s and was presumed hung; {stopped} to free its "
                    f"memory.{resume_hint(job.kind)} The last lines of its log are under Show details.", job.id))


def _phase(message: str) -> str:
    """The phase a progress message belongs to: its text before the first ":", without numbers. "step 3/10" and
    "step 4/10" are one phase, "en: gradients: batch 2" and "en: estimates: q_proj" too; "loading model" another."""
    head = message.split(":", 1)[0]
    return " ".join("".join(c for c in head if not c.isdigit()).split())


class EtaEstimator:
    """Time left from measured rates: progress made since the current phase began over the time it took,
    exponentially smoothed; None ("estimating") until the phase has made enough progress to measure."""

    def __init__(self, now: float):
        self.phase: str | None = None
        self.phase_started = now
        self.phase_fraction = 0.0
        self.rate: float | None = None  # fraction per second, smoothed

    def update(self, fraction: float, message: str, now: float) -> float | None:
        phase = _phase(message)
        if phase != self.phase:  # a new phase runs at its own speed: measure it afresh
            self.phase, self.phase_started, self.phase_fraction, self.rate = phase, now, fraction, None
            return None
        done = fraction - self.phase_fraction
        elapsed = now - self.phase_started
        if elapsed < ETA_MIN_PHASE_S or done <= 0 or done < ETA_MIN_PHASE_FRACTION * (1 - self.phase_fraction):
            return None
        rate = done / elapsed
        self.rate = rate if self.rate is None else ETA_SMOOTHING * rate + (1 - ETA_SMOOTHING) * self.rate
        return (1 - fraction) / self.rate


class JobContext:
    """What a job function gets: progress reporting with ETA, cancellation, and the store."""

    def __init__(self, store: Store, job_id: int, clock=time.time):
        self.store = store
        self.job_id = job_id
        self._clock = clock
        self._eta = EtaEstimator(clock())
        self._shown = 0.0
        self._logged: tuple[str, float] | None = None  # (phase, when) of the last line written to the log

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress in [0, 1]; raises JobCancelled if the user cancelled. Shown progress never goes back."""
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = self._clock()
        self._shown = max(self._shown, fraction)  # as the store keeps it (MAX below)
        eta = self._eta.update(self._shown, message, now)
        cursor = self.store.execute(
            "UPDATE jobs SET progress = MAX(progress, ?), message = ?, eta_s = ?, heartbeat = ?"
            " WHERE id = ? AND status = 'running'",
            (fraction, message, eta, time.time(), self.job_id),
        )
        if cursor.rowcount == 0:  # declared failed or cancelled meanwhile: it no longer holds a slot, so stop
            raise JobCancelled()
        if message and (self._logged is None or self._logged[0] != _phase(message)
                        or now - self._logged[1] >= LOG_EVERY_S):  # the story "Show details" tells, not every step
            self._logged = (_phase(message), now)
            with open(log_path(self.job_id), "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {fraction:4.0%} {message}\n")
        self.check_cancel()

    def expect_parts(self, total: int) -> None:
        """Say how many parts this job will store (a page shows "k of total done" and marks the rest pending)."""
        self.store.execute("UPDATE jobs SET parts_total = ? WHERE id = ?", (int(total), self.job_id))

    def part_done(self, name: str) -> None:
        """Record a part whose results are already in the store: a page polling the job shows it at once, and a
        cancel after this point keeps it."""
        self.store.execute("UPDATE jobs SET parts_json = json_insert(parts_json, '$[#]', ?) WHERE id = ?",
                           (name, self.job_id))

    def check_cancel(self) -> None:
        row = self.store.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (self.job_id,)).fetchone()
        if row and row["cancel_requested"]:
            raise JobCancelled()


def _heartbeat(store_path: str, job_id: int, stop: threading.Event) -> None:
    store = Store(store_path)  # own connection: sqlite connections are not shared across threads here
    while not stop.wait(HEARTBEAT_S):
        store.execute("UPDATE jobs SET heartbeat = ? WHERE id = ?", (time.time(), job_id))
    store.close()


def _wait_for_slot(store: Store, job_id: int, poll: float = QUEUE_POLL_S) -> bool:
    """Block while the job is queued behind others; True once it runs here, False if it ended or was cancelled."""
    pid, created = _process_identity()
    store.execute("UPDATE jobs SET pid = ?, pid_created = ? WHERE id = ? AND pid IS NULL", (pid, created, job_id))
    while not _claim(store, job_id):
        job = get(store, job_id)
        if job is None or job.status != "queued":
            return False
        if job.cancel_requested:
            _fail(store, job_id, "cancelled", "Cancelled by the user before it started.")
            return False
        store.execute("UPDATE jobs SET message = ?, heartbeat = ? WHERE id = ? AND status = 'queued'",
                      (queue_message(store, job_id), time.time(), job_id))
        reap(store)  # a dead worker holding a slot or a place in the queue must not block the rest forever
        time.sleep(poll)
    return True


def run_job(store: Store, job_id: int, heartbeat: bool = True) -> Job | None:
    """Run a queued job in this process once a slot is free (the worker's body; tests call it inline).

    A job that is no longer queued (cancelled, failed, or already taken) is left as it is and returned."""
    row = store.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    job = Job.from_row(row)
    try:
        if not _wait_for_slot(store, job_id):
            return get(store, job_id)
    except ShrinkError as exc:  # e.g. a bad $SHRINK_MAX_JOBS in the worker's environment
        _fail(store, job_id, "failed", str(exc))
        return get(store, job_id)
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
        _transition(store, job_id, "done", progress=1, message="done", eta_s=0,
                    result_json=json.dumps(result or {}, default=str), finished=time.time())
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
