"""What a user does, in a real browser: load, score, compress, compare."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def _set_number(page, label: str, value: int) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Enter")


def test_builtin_model_loads_and_scores_render(page, steps, server):
    page.goto(server)
    page.get_by_text("Baseline perplexity", exact=True).wait_for()
    page.get_by_text("as a 4-bit (Q4_1").wait_for()
    steps.shot("model-page")

    page.get_by_role("link", name="Layer redundancy").click()
    page.get_by_role("button", name="Compute scores").wait_for()
    _set_number(page, "Windows", 2)
    _set_number(page, "Seqlen (tokens)", 32)
    page.get_by_role("button", name="Compute scores").click()
    page.get_by_text("Most redundant layers").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    steps.shot("redundancy-page")
    plots = page.locator(".js-plotly-plot")
    assert plots.count() == 6
    heatmap = plots.nth(0)
    assert heatmap.locator(".heatmaplayer image").count() == 1  # rendered, not only declared
    rows = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[0].data[0].z.length")
    assert rows == 30  # one row per layer of the built-in model


def _small_data(page) -> None:
    """Open the data expander and use 2 windows × 32 tokens for calibration and evaluation."""
    page.get_by_text("Calibration and evaluation data").click()
    for index in range(2):
        for label, value in (("Windows", 2), ("Seqlen (tokens)", 32)):
            box = page.get_by_label(label, exact=True).nth(index)
            box.fill(str(value))
            box.press("Enter")
            page.wait_for_timeout(500)


def _preview_caption(page) -> str:
    return page.get_by_text("Achieved mean slicing").inner_text()


def test_slider_preview_run_tradeoff_and_results(page, steps, server):
    page.goto(f"{server}/slicing")
    page.get_by_text("Schedule preview").wait_for()
    _small_data(page)
    page.get_by_text("asked 0.2500").wait_for()
    steps.shot("slicing-preview")
    slider = page.get_by_role("slider").first  # target average slicing %
    slider.focus()
    for _ in range(15):
        page.keyboard.press("ArrowLeft")
    page.get_by_text("asked 0.1000").wait_for()
    steps.shot("slicing-preview-after-slider")

    page.get_by_role("button", name="Run slicing").click()
    page.get_by_text("Stored as run").wait_for()
    page.get_by_text("ppl vs average slicing fraction").first.wait_for()
    steps.shot("slicing-run-done")
    run_id = int(page.get_by_text("Stored as run").inner_text().split("Stored as run ")[1].rstrip("."))
    points = page.evaluate(
        "() => [...document.querySelectorAll('.js-plotly-plot')].flatMap(p => p.data)"
        ".filter(t => t.name && t.name.startsWith('constant') || t.name && t.name.startsWith('dynamic'))"
        ".flatMap(t => t.text || [])"
    )
    assert any(f"run {run_id} " in text for text in points)

    page.get_by_role("link", name="Results").click()
    page.get_by_text("Trade-off curves").wait_for()
    page.locator(".js-plotly-plot").first.wait_for()
    steps.shot("results-page")
    texts = page.evaluate("() => document.querySelectorAll('.js-plotly-plot')[0].data.flatMap(t => t.text || [])")
    assert any(f"run {run_id} " in text for text in texts)
