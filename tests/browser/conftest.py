"""A real Streamlit server and headless Debian Chromium driven by Playwright.

Screenshots of every step go to ``test-artifacts/browser/``; a failing test
also leaves its page screenshot and console log there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_healthy(url: str, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("streamlit did not become healthy")


def start_server(log_name: str) -> tuple[subprocess.Popen, str]:
    """Start the dashboard on a free localhost port (the test session's cache); wait until healthy."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    log = open(ARTIFACTS / log_name, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process)
    except Exception:
        stop_server(process)
        raise
    return process, url


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def server():
    """Base URL of a dashboard started on a free localhost port (isolated cache)."""
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: `make test` installs it with apt-get.")
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    process, url = start_server("streamlit-server.log")
    yield url
    stop_server(process)


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


class Steps:
    """Numbered screenshots of one test's steps."""

    def __init__(self, page, name: str) -> None:
        self.page, self.name, self.count = page, name, 0

    def shot(self, label: str) -> None:
        self.count += 1
        self.page.screenshot(path=str(ARTIFACTS / f"{self.name}-{self.count:02d}-{label}.png"), full_page=True)


@pytest.fixture
def page(browser, request):
    """A fresh browser page (own session); on failure its screenshot and console log are kept."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.set_default_timeout(90_000)
    yield page
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        page.screenshot(path=str(ARTIFACTS / f"FAILED-{request.node.name}.png"), full_page=True)
        (ARTIFACTS / f"FAILED-{request.node.name}.console.log").write_text("\n".join(console))
    context.close()


@pytest.fixture
def steps(page, request) -> Steps:
    return Steps(page, request.node.name)
