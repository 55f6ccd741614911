"""The measuring pages in a real browser on the built-in model: Dropping (by measured sensitivity, iterative),
Sensitivity, the two optimizers, and every run on the Compare chart.
Small data keeps it to a few minutes; screenshots of every step
go to ``test-artifacts/browser/`` (look at them).

Opt-in (``-m opt_in``): it drives long computations through many reruns and was not yet
reliable enough under load to gate CI.
"""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import run_ids, scores_ready, set_slider, wait_for_run
from tests.browser.test_user_journey import _assert_inside, _open_data, _plot_data, _set_number

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.opt_in]

CALIB, EVAL = (4, 64), (4, 128)  # the smallest sample the sensitivity lab takes: a look, not a measurement


def _small_data(page) -> None:
    _open_data(page)
    _set_number(page, "Calibration windows", CALIB[0])
    _set_number(page, "Calibration seqlen (tokens)", CALIB[1])
    _set_number(page, "Evaluation windows", EVAL[0])
    _set_number(page, "Evaluation seqlen (tokens)", EVAL[1])


def _press(page, name: str) -> None:
    """Click a button once the page has finished its last rerun (a click during a rerun can be lost)."""
    page.wait_for_timeout(2000)
    page.get_by_role("button", name=re.compile(name)).click()


def test_sensitivity_dropping_compare_and_optimizers(page, steps, server):
    page.goto(f"{server}/model")
    page.get_by_text("Baseline perplexity", exact=True).wait_for()

    page.get_by_role("link", name="Dropping").click()
    page.get_by_role("heading", name="Preview").wait_for()
    _small_data(page)
    set_slider(page, page.get_by_role("slider").first, 2)  # how many: two, so the iterative choice re-ranks once
    page.wait_for_timeout(2000)  # let the slider's rerun finish: a click during a rerun can be lost
    page.locator("[data-testid=stSelectbox]").filter(has_text="Ranked by").click()
    page.get_by_role("option", name=re.compile("measured sensitivity")).click()
    scores_ready(page, "cheaper to drop", 600_000)  # presses "Compute the sensitivity ranking" once the page is stable
    page.get_by_text("Iterative: re-rank after each drop").click()
    scores_ready(page, "chosen iteratively", 600_000)
    steps.shot("dropping-by-sensitivity-iterative")
    preview = _plot_data(page, 0)
    assert preview["type"] == "log" and all(y > 0 for t in preview["data"] for y in t["y"])
    _assert_inside(preview)
    before = run_ids()
    _press(page, "^Run dropping")
    wait_for_run(page, "dropping", before)
    steps.shot("dropping-run")

    page.get_by_role("link", name="Sensitivity").click()
    _press(page, "^Measure sensitivity")
    page.get_by_text("What this says").wait_for(timeout=600_000)
    page.locator(".js-plotly-plot").nth(1).wait_for()
    steps.shot("sensitivity-page")

    page.get_by_role("link", name="Quantization").click()
    page.get_by_text("optimize for a size budget (measured)").click()
    _press(page, "^Optimize for budget")
    page.get_by_text("Chosen:").first.wait_for(timeout=900_000)
    steps.shot("quantization-optimizer")
    before = run_ids()
    _press(page, "^Run the optimizer")
    page.get_by_text("Stored: the trade-off chart").wait_for(timeout=600_000)
    assert len(run_ids() - before) >= 2
    page.wait_for_timeout(1500)
    steps.shot("quantization-optimizer-runs")
    _assert_inside(_plot_data(page, -1))

    page.get_by_role("link", name="Slicing").click()
    page.get_by_text("find the best (measured)").click()
    _press(page, "^Find best schedule")
    page.get_by_text("Chosen:").first.wait_for(timeout=900_000)
    steps.shot("slicing-find-best")

    page.get_by_role("link", name="Compare").click()  # every run above on one chart (the sweep is AppTested)
    page.get_by_text("perplexity vs size").first.wait_for()
    page.wait_for_timeout(1500)
    steps.shot("compare-methods")
    names = [t["name"] for t in _plot_data(page, 0)["data"]]
    assert "drop layers by sensitivity, iterative" in names and any("quantization" in (n or "") for n in names)
    _assert_inside(_plot_data(page, 0))
