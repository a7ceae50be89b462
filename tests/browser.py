"""Shared pieces of the real-browser tests: the app in a subprocess and Debian's headless Chromium."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from shrink_core.paths import REPO_ROOT

from .jobwait import ENDED, HANG_S, describe_job, find_job, job_rows

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# every real-browser test module: `pytestmark = BROWSER_MARKS`
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.integration,
    pytest.mark.skipif(not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)),
                       reason="Debian's chromium and chromium-driver are not installed (./run test installs them)"),
]


def body(driver) -> str:
    """The page's visible text."""
    return driver.find_element("tag name", "body").text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_app(home: Path, port: int | None = None):
    """Starts `streamlit run app.py` on localhost with its own SHRINK_HOME; yields the URL. On exit the app and every
    process in its group are stopped (job workers run in sessions of their own and outlive it, as they would a real
    restart; the shrink_home fixture kills those)."""
    port = port or free_port()
    env = dict(os.environ, SHRINK_HOME=str(home), HF_HUB_OFFLINE="1")
    log = open(home.parent / f"streamlit-{port}.log", "wb")  # noqa: SIM115 (the app writes to it until it stops)
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "localhost",
         "--server.headless", "true"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/_stcore/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"streamlit did not start; see {log.name}") from None
                time.sleep(0.5)
        yield url
    finally:
        _stop_group(proc)
        log.close()


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group `proc` leads, SIGKILL it after 15 s, and reap `proc`."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 30)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children it left in the group go too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def chromium(offline: bool = False):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    if offline:
        driver.set_network_conditions(offline=True, latency=0, throughput=0)
    return driver


def wait_for(driver, predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate(driver)
        except Exception:  # the page is re-rendering; try again
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; {_screenshot(driver)}")


def _screenshot(driver) -> str:
    shot = Path(os.environ.get("SHRINK_SCREENSHOTS", "/tmp")) / "browser-failure.png"
    try:
        driver.save_screenshot(str(shot))
    except Exception as exc:  # a dead browser must not hide the real failure
        return f"no screenshot ({exc})"
    return f"screenshot at {shot}"


def last_job_id(home) -> int:
    """The newest job id in the store under `home` (0 if none): pass it as `after` before clicking a button that
    submits a job, to wait on that job."""
    rows = job_rows(home)
    return rows[0]["id"] if rows else 0


def wait_on_job(driver, home, predicate, what: str, *, kind: str | None = None, job_id: int | None = None,
                after: int = 0, expect: str | None = "done", rerender_s: float = 90, appear_s: float = 300,
                timeout: float = HANG_S):
    """Wait for `predicate` on the page while a job runs, judged by the job's state in the store, not a clock.

    The job is `job_id`, or the newest job of `kind` with an id above `after` (one the page submits). If it ends
    other than `expect` (None: any end), the test fails with its error and log tail; once it ended, the page gets
    `rerender_s` to show it, and a job the page was to submit gets `appear_s` to show up in the store. The only
    deadline otherwise is `timeout`, generous, to catch hangs."""
    started, ended_at = time.time(), None
    deadline = started + timeout
    while True:
        try:
            value = predicate(driver)
        except Exception:  # the page is re-rendering; try again
            value = None
        if value:
            return value
        row = find_job(home, job_id, kind, after)
        if row is not None and row["status"] in ENDED:
            if expect and row["status"] != expect:
                raise AssertionError(f"while waiting for {what}: {describe_job(home, row)}\n{_screenshot(driver)}")
            ended_at = ended_at or time.time()
            if time.time() - ended_at > rerender_s:
                raise AssertionError(f"job {row['id']} ended {row['status']} {rerender_s:.0f} s ago, but the page "
                                     f"does not show {what}; {_screenshot(driver)}")
        if row is None and time.time() - started > appear_s:
            raise AssertionError(f"while waiting for {what}: no {kind or ''} job above id {after} appeared in the "
                                 f"store within {appear_s:.0f} s; {_screenshot(driver)}")
        if time.time() > deadline:
            state = describe_job(home, row) if row else f"no {kind or ''} job in the store"
            raise AssertionError(f"no sign of {what} within {timeout:.0f} s (a hang?): {state}\n{_screenshot(driver)}")
        time.sleep(2)  # each look lays out the whole page: polling faster takes CPU from the job it waits on
