"""Entry point of a job's worker process: `python -m shrink_core.runtime.worker JOB_ID STORE_PATH`."""
import os
import signal
import sys

from shrink_core.results.store import Store
from shrink_core.runtime.jobs import run_job


def main() -> int:
    job_id, store_path = int(sys.argv[1]), sys.argv[2]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # SIGTERM from cancel: exit through normal cleanup so the store is left consistent.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    job = run_job(Store(store_path), job_id)
    return 0 if job is not None and job.status == "done" else 1


if __name__ == "__main__":
    sys.exit(main())
