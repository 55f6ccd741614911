"""Bad input, concurrent sessions, cancelling and crashing, in a real browser."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

import pytest

from engine.core.data import DataSpec
from engine.core.paths import cache_root
from engine.runs.plans import EvalPlan, QuantPlan
from engine.runs.runner import run_quantization
from engine.runs.store import ResultsStore
from tests.browser.conftest import press, scores_ready, set_slider, start_server, stop_server

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _set(page, label: str, value, nth: int = 0) -> None:
    box = page.get_by_label(label, exact=True).nth(nth)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(400)


def _small_data(page, calib_windows: int = 2, calib_seqlen: int = 32) -> None:
    page.get_by_text("Calibration and evaluation data").click()
    _set(page, "Calibration windows", calib_windows)
    _set(page, "Calibration seqlen (tokens)", calib_seqlen)
    _set(page, "Evaluation windows", 2)
    _set(page, "Evaluation seqlen (tokens)", 32)


def _verify_weights(page, server) -> None:
    page.goto(f"{server}/model")
    page.get_by_role("button", name="Verify weights").click()
    page.get_by_text("Weights unchanged since load").wait_for()


def test_bad_inputs_show_messages_and_change_nothing(page, steps, server, tmp_path):
    rows = [r.id for r in ResultsStore().runs()]
    page.goto(f"{server}/model")
    page.get_by_text("Baseline perplexity", exact=True).wait_for()
    source = page.get_by_role("textbox", name="Hugging Face id or local path")
    source.fill("nobody/no-such-model")
    source.press("Enter")  # submits the sidebar form
    page.get_by_text("Model not loaded").wait_for()
    page.get_by_text("Still using smollm2-135m.").wait_for()
    steps.shot("missing-model")

    text_source = page.get_by_test_id("stMain").get_by_test_id("stSelectbox").first
    text_source.click()
    page.keyboard.type("file")
    page.keyboard.press("Enter")
    empty, binary = tmp_path / "empty.txt", tmp_path / "image.bin"
    empty.write_bytes(b"")
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    page.locator("input[type=file]").set_input_files(str(empty))
    page.get_by_text("is empty").wait_for()
    steps.shot("empty-upload")
    page.locator("input[type=file]").set_input_files(str(binary))
    page.get_by_text("looks binary").wait_for()
    steps.shot("binary-upload")

    page.goto(f"{server}/model")
    _set(page, "Evaluation seqlen (tokens)", 9000)
    page.get_by_text("longer than this model allows").wait_for()
    steps.shot("seqlen-too-long")

    page.goto(f"{server}/quantization")
    page.get_by_role("heading", name="Bit map preview").wait_for()
    _small_data(page)
    scores_ready(page, r"^Average [0-9]")
    set_slider(page, page.get_by_role("slider").nth(1), 8)  # low bits above the high level
    page.get_by_text("must not exceed the high level").wait_for()
    steps.shot("low-above-high-bits")
    assert [r.id for r in ResultsStore().runs()] == rows
    _verify_weights(page, server)


def _start_preview(page, server, low_bits_presses: int) -> None:
    page.goto(f"{server}/quantization")
    page.get_by_role("heading", name="Bit map preview").wait_for()
    _small_data(page)
    scores_ready(page, r"^Average [0-9]")
    set_slider(page, page.get_by_role("slider").nth(1), 2 + low_bits_presses)
    page.get_by_text(f"at {2 + low_bits_presses} bits").first.wait_for()


def test_two_sessions_compress_at_once_with_independent_results(browser, server, builtin, steps, page):
    first, second = page, browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    second.set_default_timeout(90_000)
    _start_preview(first, server, 0)   # 4/2 bits
    _start_preview(second, server, 1)  # 4/3 bits
    before = {r.id for r in ResultsStore().runs()}
    for session in (first, second):
        press(session, session.get_by_role("button", name="Preview (2 windows"),  # the 2 evaluation windows set
              session.get_by_test_id("stProgress").or_(session.get_by_text("Stored as run")))
    first.get_by_text("Stored as run").wait_for()
    second.get_by_text("Stored as run").wait_for()
    steps.shot("first-session")
    new = [r for r in ResultsStore().runs() if r.id not in before and r.method == "quantization"]
    assert sorted(r.config["low_bits"] for r in new) == [2, 3]
    for run in new:  # each equals the same plan run alone, in this process
        plan = QuantPlan(low_bits=run.config["low_bits"], low_fraction=0.25)
        alone = run_quantization(ResultsStore(cache_root() / "alone.sqlite"), builtin, plan,
                                 DataSpec(split="calibration", seqlen=32, n_windows=2),
                                 EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2), preview=True))
        assert run.metrics["ppl"] == pytest.approx(alone.metrics["ppl"], rel=1e-5)
    second.context.close()
    _verify_weights(first, server)


def test_leaving_a_page_mid_run_stores_it_as_interrupted(page, server, steps):
    """A slicing run started, then the Results page opened before it finished: it says which run stopped, where,
    when and how far it got, and lists it as interrupted; no run is stored, the notice shows once, and no Cancel
    button is left once nothing runs."""
    before = [r.id for r in ResultsStore().runs()]
    stopped_before = len(ResultsStore().interrupted())
    page.goto(f"{server}/slicing")
    page.get_by_text("Schedule preview").wait_for()
    _small_data(page, calib_windows=8, calib_seqlen=256)  # a run of some seconds: long enough to leave it
    scores_ready(page, "Achieved mean slicing")
    press(page, page.get_by_role("button", name="Run slicing"), page.get_by_text("Slicing · slicing:"))
    page.get_by_text("Stay on this page until it finishes").wait_for()
    assert page.get_by_role("button", name="Cancel run").count() == 1  # shown once the run is under way
    page.get_by_role("link", name="Results", exact=True).click()
    notice = page.get_by_text("stopped before it finished")
    notice.wait_for()
    assert "Slicing" in notice.inner_text() and "lists it as interrupted" in notice.inner_text()
    page.get_by_text("Interrupted computations (").click()
    page.get_by_role("button", name="Forget interrupted computations").wait_for()
    steps.shot("left-mid-run")
    page.wait_for_timeout(3000)
    assert [r.id for r in ResultsStore().runs()] == before
    stopped = ResultsStore().interrupted()
    assert len(stopped) == stopped_before + 1
    assert stopped.iloc[0]["label"].startswith("Slicing") and stopped.iloc[0]["page"] == "Slicing"
    assert "/" in stopped.iloc[0]["completed"]  # how far it got: "stage: done/total"
    page.get_by_role("link", name="Slicing", exact=True).click()
    page.get_by_text("Schedule preview").wait_for()
    assert page.get_by_text("stopped before it finished").count() == 0  # said once
    assert page.get_by_role("button", name="Cancel run").count() == 0  # nothing runs: nothing to cancel


def _no_partial_files() -> list[Path]:
    return [p for p in cache_root().rglob("*") if p.suffix == ".tmp" or p.name.startswith(".tmp")]


def test_cancel_then_kill_mid_run_lose_nothing(browser):
    """A slicing run cancelled, then the same run started again and the server killed (SIGKILL) mid-run: no run
    stored either time, no half-written file, the store's integrity intact, and a restarted app shows the results.

    Its own server (the kill ends it); 24 × 256 calibration windows keep the run busy long enough to interrupt.
    """
    from tests.browser.conftest import Steps

    process, url = start_server("killed-server.log")
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(90_000)
    steps = Steps(page, "test_cancel_then_kill_mid_run_lose_nothing")
    try:
        before = [r.id for r in ResultsStore().runs()]
        page.goto(f"{url}/slicing")
        page.get_by_text("Schedule preview").wait_for()
        _small_data(page, calib_windows=24, calib_seqlen=256)
        scores_ready(page, "Achieved mean slicing")
        run = page.get_by_role("button", name="Run slicing")
        press(page, run, page.get_by_text("Slicing · slicing:"))
        steps.shot("running")
        page.get_by_role("button", name="Cancel run").click()
        page.get_by_text("Nothing from the cancelled run was stored.").wait_for()
        steps.shot("cancelled")
        page.wait_for_timeout(3000)
        assert [r.id for r in ResultsStore().runs()] == before
        assert not _no_partial_files()

        press(page, run, page.get_by_text("Slicing · slicing:"))  # the same run again, then the app is killed
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        stop_server(process)
    with sqlite3.connect(ResultsStore().path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert [r.id for r in ResultsStore().runs()] == before
    process, url = start_server("restarted-server.log")
    try:
        page.goto(f"{url}/results")
        page.get_by_role("heading", name="Results").wait_for()
        # opened by its own URL on a new server: still through the router (its sidebar and page titles)
        page.get_by_role("textbox", name="Hugging Face id or local path").wait_for()
        assert page.get_by_test_id("stSidebarNav").get_by_text("Layer redundancy").count() == 1
        steps.shot("after-restart")
        assert not _no_partial_files()
    finally:
        page.context.close()
        stop_server(process)
