"""Small real jobs that exercise the runner itself (used by `doctor`-style checks and the job-runner tests)."""
from __future__ import annotations

import time


def tick_job(ctx, steps: int = 10, step_seconds: float = 0.1, fail_at: int | None = None) -> dict:
    """Counts to `steps`, reporting progress each step; raises at `fail_at` to test failure handling."""
    for step in range(steps):
        if fail_at is not None and step == fail_at:
            raise RuntimeError(f"asked to fail at step {step}")
        time.sleep(step_seconds)
        ctx.progress((step + 1) / steps, f"step {step + 1}/{steps}")
    return {"steps": steps}


def sleep_unit(seconds: float, value: int, pid_file: str | None = None) -> dict:
    """A unit of work for the executor tests: says where it runs (its pid in `pid_file`, rewritten by a retry),
    then returns `value` after `seconds`, long enough to be killed or cancelled mid-task."""
    import os
    from pathlib import Path

    if pid_file:
        Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)
    return {"value": value, "pid": os.getpid()}
