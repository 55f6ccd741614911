"""What a user does, in a real browser: load, score, compress with two methods, compare, export a report.

Every step leaves a screenshot in ``test-artifacts/browser/`` (look at them).
"""

from __future__ import annotations

import math
import re

import pytest

from tests.browser.conftest import press, run_ids, run_started, scores_ready, set_slider, wait_for_run

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CALIB, EVAL = (8, 128), (4, 128)


def _set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(600)


def _open_data(page) -> None:
    page.get_by_text("Calibration and evaluation data").click()


PLOT_DATA = """(index) => {
    const plots = [...document.querySelectorAll('.js-plotly-plot')];
    const plot = plots.at(index);
    return {
        data: plot.data.map(t => ({name: t.name, y: Array.from(t.y || []), text: t.text || []})),
        range: plot._fullLayout.yaxis.range,
        type: plot._fullLayout.yaxis.type,
    };
}"""


def _plot_data(page, index: int = -1):
    return page.evaluate(PLOT_DATA, index)


def _assert_inside(plot) -> None:
    low, high = plot["range"]
    for trace in plot["data"]:
        for y in trace["y"]:
            value = math.log10(y) if plot["type"] == "log" else y
            assert low <= value <= high, (trace["name"], y, plot["range"])


def test_score_compress_compare_and_report(page, steps, server, tmp_path):
    """Baseline, scores, a slicing run, the bit map pinned three times (one title; a note on one), a
    quantization preview and full run, a verified GGUF export, the Results page's scales and the report: four
    pinned sections, the note with its own chart, no external loads, no horizontal scrolling at 1,200 px."""
    page.goto(f"{server}/model")
    page.get_by_text("Baseline perplexity", exact=True).wait_for()
    page.get_by_text("as a 4-bit (Q4_1").wait_for()
    _set_number(page, "Evaluation windows", EVAL[0])
    _set_number(page, "Evaluation seqlen (tokens)", EVAL[1])
    press(page, page.get_by_role("button", name="Measure baseline perplexity"), page.get_by_text("Stored as run"))
    page.get_by_text("Stored as run").wait_for()
    steps.shot("model-page-baseline")

    page.get_by_role("link", name="Layer redundancy").click()
    _set_number(page, "Calibration windows", CALIB[0])
    _set_number(page, "Calibration seqlen (tokens)", CALIB[1])
    scores_ready(page, "Most redundant layers")
    page.locator(".js-plotly-plot").nth(5).wait_for()
    steps.shot("redundancy-page")
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == 6
    assert plots.nth(0).locator(".heatmaplayer image").count() == 1  # rendered, not only declared
    rows = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[0].data[0].z.length")
    assert rows == 30  # one row per layer of the built-in model
    profile = _plot_data(page, 2)
    assert profile["range"][0] > 0.5  # zoomed to the bulk: layer 0 (LR ≈ 0) is named, not plotted into the axis
    page.get_by_role("button", name="Add to report").nth(2).click()
    page.get_by_role("button", name="Pin this chart").click()
    page.get_by_text("Pinned").wait_for()
    page.keyboard.press("Escape")

    page.get_by_role("link", name="Slicing").click()
    page.get_by_role("heading", name="Schedule preview").wait_for()
    _open_data(page)
    assert page.get_by_label("Evaluation windows", exact=True).input_value() == str(EVAL[0])  # kept across pages
    scores_ready(page, "asked 0.2500")
    steps.shot("slicing-preview")
    set_slider(page, page.get_by_role("slider").first, 20)  # target average slicing: dynamic at 20%
    page.get_by_text("asked 0.2000").wait_for()
    before = run_ids()
    press(page, page.get_by_role("button", name="Run slicing"), run_started(page, before))
    wait_for_run(page, "slicing", before)
    page.get_by_text("perplexity vs size").first.wait_for()
    steps.shot("slicing-run")
    tradeoff = _plot_data(page, -1)
    names = [t["name"] for t in tradeoff["data"]]
    assert any(n and n.startswith("dense") for n in names) and "slicing, dynamic SB=0.1" in names
    _assert_inside(tradeoff)

    page.get_by_role("link", name="Quantization").click()
    page.get_by_role("heading", name="Bit map preview").wait_for()
    scores_ready(page, r"^Average [0-9]")
    low = page.get_by_role("slider").nth(1)
    for n, level in enumerate((2, 4, 3)):  # the bit map pinned three times: one title, three charts
        set_slider(page, low, level)
        page.get_by_text(f"at {level} bits").first.wait_for()
        page.get_by_role("button", name="Add to report").first.click()
        if n == 1:
            page.get_by_label("Note for the report (optional)").fill("the middle one, with a note")
        page.get_by_role("button", name="Pin this chart").click()
        page.get_by_text(f"({n + 2} chart(s) in the report").wait_for()  # after the redundancy profile
        page.keyboard.press("Escape")
        page.wait_for_timeout(800)
    before = run_ids()
    press(page, page.get_by_role("button", name=re.compile("Preview")), run_started(page, before))
    wait_for_run(page, "quantization", before)
    before = run_ids()
    press(page, page.get_by_role("button", name=re.compile("Full evaluation")), run_started(page, before))
    wait_for_run(page, "quantization", before)
    page.locator(".js-plotly-plot").nth(1).wait_for()
    steps.shot("quantization-preview-and-full")
    types = page.get_by_text("Tensor types in the file")
    types.scroll_into_view_if_needed()
    assert page.get_by_text(re.compile(r"3-bit → Q4_1 \(exact\)")).count() == 1  # 3-bit codes kept in Q4_1 blocks
    folder = page.get_by_label("Folder", exact=True)
    folder.fill(str(tmp_path / "gguf"))
    folder.press("Enter")
    page.wait_for_timeout(1500)
    exported = page.get_by_text("Exported to")
    press(page, page.get_by_role("button", name=re.compile("^Export and verify")),
          exported.or_(page.get_by_test_id("stProgress")))
    exported.wait_for(timeout=180_000)
    assert "within ±2.0%" in exported.inner_text()  # the reloaded file's perplexity, checked on the spot
    steps.shot("quantization-exported-gguf")
    assert (tmp_path / "gguf" / "model.gguf").stat().st_size > 0

    page.get_by_role("link", name="Results", exact=True).click()
    page.get_by_text("Trade-off curves").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    steps.shot("results-auto")  # auto picks log here: the runs span 18-145
    _assert_inside(_plot_data(page, 0))
    for scale in ("linear", "log"):  # the quality scale radio: every point inside the axes either way
        page.get_by_text(scale, exact=True).click()
        page.wait_for_timeout(1500)
        plot = _plot_data(page, 0)
        assert plot["type"] == scale
        _assert_inside(plot)
        steps.shot(f"results-{scale}")
    with page.expect_download() as download:
        page.get_by_role("button", name="Download HTML report").click()
    report = tmp_path / "report.html"
    download.value.save_as(report)
    html = report.read_text()
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "Executive summary" in html
    # four pins: the redundancy profile, then the bit map three times (a pin is keyed by what it shows)
    assert html.count("<h2>Per-layer bit allocation") == 3, re.findall(r"<h2>[^<]*", html)
    sections = html.split("<h2>Per-layer bit allocation")
    assert "the middle one, with a note" in sections[2] and "the middle one, with a note" not in sections[1]
    viewer = page.context.new_page()
    viewer.set_viewport_size({"width": 1200, "height": 900})
    viewer.goto(report.as_uri())
    viewer.locator(".js-plotly-plot").first.wait_for()
    viewer.screenshot(path=str(steps.path("report")), full_page=True)
    assert viewer.evaluate("() => document.documentElement.scrollWidth") <= 1200  # no horizontal scrolling
    assert viewer.locator(".js-plotly-plot").count() >= 1
    viewer.close()
