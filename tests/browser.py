"""Shared pieces of the real-browser tests: the app in a subprocess and Debian's headless Chromium."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import shutil

import pytest

from shrink_core.paths import REPO_ROOT

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
    """Starts `streamlit run app.py` on localhost with its own SHRINK_HOME; yields the URL."""
    port = port or free_port()
    env = dict(os.environ, SHRINK_HOME=str(home), HF_HUB_OFFLINE="1")
    log = open(home.parent / f"streamlit-{port}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.address", "localhost",
         "--server.headless", "true"],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
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
                    raise RuntimeError(f"streamlit did not start; see {log.name}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


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
    shot = Path(os.environ.get("SHRINK_SCREENSHOTS", "/tmp")) / "browser-failure.png"
    driver.save_screenshot(str(shot))
    raise AssertionError(f"timed out waiting for {what}; screenshot at {shot}")
