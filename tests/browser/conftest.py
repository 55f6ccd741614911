"""A real Streamlit server and headless Debian Chromium driven by Playwright.

Screenshots of every step go to ``test-artifacts/browser/``; a failing test
also leaves its page screenshot and console log there.
"""

from __future__ import annotations

import os
import re
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


@pytest.fixture(scope="package")
def server():
    """Base URL of a dashboard started on a free localhost port (isolated cache).

    Package scope: the server stops when the browser tests end, so a job a closed page left running
    cannot take a core from the tests that follow.
    """
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian chromium is missing: `make test` installs it with apt-get.")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)  # emptied once per run by tests/conftest.py
    process, url = start_server(f"streamlit-server-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.log")
    yield url
    stop_server(process)


@pytest.fixture(scope="package")
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

    def path(self, label: str):
        """The next numbered screenshot path of this test."""
        self.count += 1
        return ARTIFACTS / f"{self.name}-{self.count:02d}-{label}.png"

    def shot(self, label: str) -> None:
        """Screenshot of the whole page: Streamlit scrolls inside its main block, so the viewport is
        stretched to that block's height for the shot."""
        size = self.page.viewport_size
        height = self.page.evaluate(
            "() => Math.max(...[...document.querySelectorAll('[data-testid=stMain], "
            "[data-testid=stMainBlockContainer]')].map(e => e.scrollHeight), 0)")
        self.page.set_viewport_size({"width": size["width"],
                                     "height": int(min(max(size["height"], height + 80), 8000))})
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(self.path(label)), full_page=True)
        self.page.set_viewport_size(size)


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


def scores_ready(page, preview: str, timeout_ms: int = 180_000) -> None:
    """Press the page's 'Compute ... scores' button if the scores are not cached, then wait for the preview."""
    page.wait_for_timeout(2000)  # let the rerun after the last input finish
    compute = page.get_by_role("button", name=re.compile("^Compute"))
    ready = page.get_by_text(re.compile(preview)).first
    compute.first.or_(ready).first.wait_for()
    if not ready.is_visible():
        press(page, compute.first, ready.or_(page.get_by_test_id("stProgress")))
    ready.wait_for(timeout=timeout_ms)
    page.wait_for_timeout(1000)


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until Streamlit shows no running script (its status widget's running icon is gone)."""
    running = page.get_by_test_id("stStatusWidgetRunningIcon").or_(page.get_by_test_id("stStatusWidgetRunningManIcon"))
    for _ in range(timeout_ms // 250):
        if running.count() == 0:
            return
        page.wait_for_timeout(250)


def press(page, button, started, tries: int = 3, retry_after_ms: int = 20_000) -> None:
    """Click ``button`` on an idle page and wait until ``started``: a locator the click should bring up
    (a progress bar, the result) or a function that says whether the work began (e.g. a new stored run).

    A click that lands during a rerun can be lost; when nothing started, the page is idle again and the
    button is still there, the click is repeated (a running job keeps the page busy, so a slow job is
    never started twice).
    """
    def has_started() -> bool:
        return started() if callable(started) else started.first.is_visible()

    for attempt in range(tries):
        wait_idle(page)
        page.wait_for_timeout(500)
        button.click()
        for _ in range(retry_after_ms // 250):
            if has_started():
                return
            page.wait_for_timeout(250)
        wait_idle(page)
        if has_started() or not button.count():
            return
    if not callable(started):
        started.first.wait_for()


def run_started(page, before: set[int]):
    """For :func:`press`: a progress bar is up, or a run not in ``before`` is stored."""
    progress = page.get_by_test_id("stProgress")
    return lambda: progress.first.is_visible() or bool(run_ids() - before)


def set_slider(page, slider, target: int) -> None:
    """Move a Streamlit slider to ``target`` with the keyboard, re-reading its value (reruns can eat keys).

    Select-sliders report the option's index in ``aria-valuenow`` and the option in ``aria-valuetext``.
    """
    def value() -> int:
        text = slider.get_attribute("aria-valuetext") or slider.get_attribute("aria-valuenow")
        return int(float(text))

    for _ in range(80):
        current = value()
        if current == target:
            page.wait_for_timeout(800)
            if value() == target:
                return
            continue
        slider.focus()
        page.keyboard.press("ArrowRight" if current < target else "ArrowLeft")
        page.wait_for_timeout(250)
    raise AssertionError(f"slider stuck at {slider.get_attribute('aria-valuenow')}, wanted {target}")


def wait_for_run(page, method: str, before: set[int], timeout_s: float = 300) -> int:
    """Wait until the store holds a new run of ``method`` (ids not in ``before``) and the page shows it."""
    import time

    from engine.runs.store import ResultsStore

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        new = [r.id for r in ResultsStore().runs(method=method) if r.id not in before]
        if new:
            page.get_by_text(f"stored as run {max(new)}").wait_for()
            return max(new)
        page.wait_for_timeout(1000)
    raise AssertionError(f"no new {method} run within {timeout_s} s")


def run_ids() -> set[int]:
    from engine.runs.store import ResultsStore

    return {r.id for r in ResultsStore().runs()}
