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
    page.get_by_text("Baseline perplexity").wait_for()
    page.get_by_text("4-bit (Q4_1)").wait_for()
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
