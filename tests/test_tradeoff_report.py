"""Trade-off curves, Pareto frontier and the HTML report."""

from __future__ import annotations

import re

import pandas as pd

from engine.report import ReportSection, build_report
from engine.tradeoff import pareto_mask, quality_axes, tradeoff_figure, with_labels


def _frame(store):
    data = {"source": "wiki-offline", "split": "evaluation", "n_windows": 4, "seqlen": 128}
    points = [("dense", None, 1.0, 20.0), ("slicing", "constant", 0.9, 30.0),
              ("slicing", "constant", 0.8, 45.0), ("slicing", "dynamic SB=0.1", 0.8, 40.0),
              ("slicing", "dynamic SB=0.1", 0.9, 33.0)]
    for method, series, fraction, ppl in points:
        store.add_run(model="m", model_fingerprint="f", method=method,
                      config={"series": series} if series else {}, data=data,
                      metrics={"ppl": ppl, "param_fraction": fraction, "acc.layerlab_wiki_lastword": 1 / ppl},
                      duration_s=1.0)
    return store.runs_frame()


def test_pareto_mask():
    assert pareto_mask([1, 2, 3, 2], [10, 5, 1, 6], lower_is_better=True) == [True, True, True, False]
    assert pareto_mask([1, 2, 3], [0.5, 0.4, 0.6], lower_is_better=False) == [True, False, True]


def test_tradeoff_figure_has_series_baseline_and_frontier(store):
    frame = _frame(store)
    assert set(quality_axes(frame)) == {"metrics.ppl", "metrics.acc.layerlab_wiki_lastword"}
    labelled = with_labels(frame)
    assert set(labelled["series"]) == {"dense", "constant", "dynamic SB=0.1"}
    assert set(labelled["data_label"]) == {"wiki-offline evaluation, 4 × 128"}
    fig = tradeoff_figure(frame, "metrics.param_fraction", "metrics.ppl", "test data")
    names = [trace.name for trace in fig.data]
    assert {"dense", "constant", "dynamic SB=0.1", "Pareto frontier"} <= set(names)
    front = fig.data[names.index("Pareto frontier")]
    assert sorted(zip(front.x, front.y)) == [(0.8, 40.0), (0.9, 30.0), (1.0, 20.0)]
    assert fig.layout.shapes[0].y0 == 20.0  # dense baseline line
    assert "test data" in fig.layout.title.text


def test_report_is_self_contained(store):
    frame = _frame(store)
    fig = tradeoff_figure(frame, "metrics.param_fraction", "metrics.ppl", "test data")
    table = pd.DataFrame({"x": [1.0], "y": [2.0]})
    html = build_report("Report", {"m": {"layers": 30}}, [ReportSection("ppl", fig, "test data", table)], frame)
    assert html.startswith("<!DOCTYPE html>") and "Plotly.newPlot" in html
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert "Computed on: test data" in html and "layers" in html
