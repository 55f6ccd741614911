"""The optimizer's candidate chart: one marker per candidate, readable labels, every point inside the axes."""

from __future__ import annotations

import pandas as pd

from engine.viz.optimizer_charts import SOURCE_COLOURS, candidates_chart


def _table(chosen: str) -> pd.DataFrame:
    rows = [("optimizer #1", "optimizer", 0.948, 0.52), ("optimizer #2", "optimizer", 0.9481, 0.53),
            ("optimizer #3 (= ZD ordering)", "optimizer", 0.9482, 0.50), ("uniform", "uniform", 1.7, 1.6),
            ("LIM ordering", "ordering", 1.19, 0.58)]
    return pd.DataFrame([{"candidate": c, "source": s, "predicted damage": p, "measured ΔNLL": m,
                          "chosen": c.startswith(chosen)} for c, s, p, m in rows])


def test_only_the_chosen_solver_candidate_is_labelled_and_every_point_is_inside_the_axes():
    fig = candidates_chart(_table("optimizer #2"), "built-in; 8 windows")
    solver = next(t for t in fig.data if t.name == "optimizer")
    assert list(solver.text) == ["", "optimizer #2", ""]  # piled-up neighbours stay readable
    assert list(solver.customdata) == ["optimizer #1", "optimizer #2", "optimizer #3"]  # hover names all
    assert list(solver.marker.symbol) == ["circle", "star", "circle"]
    assert solver.marker.color == SOURCE_COLOURS["optimizer"]
    assert [list(t.text) for t in fig.data if t.name != "optimizer"] == [["uniform"], ["LIM ordering"]]
    (x0, x1), (y0, y1) = fig.layout.xaxis.range, fig.layout.yaxis.range
    for trace in fig.data:
        assert all(x0 < x < x1 for x in trace.x) and all(y0 < y < y1 for y in trace.y)
    assert "predicted damage" in fig.layout.xaxis.title.text and "8 windows" in fig.layout.title.text


def test_when_a_competitor_is_chosen_the_best_measured_solver_candidate_keeps_its_label():
    fig = candidates_chart(_table("LIM"), "t")
    solver = next(t for t in fig.data if t.name == "optimizer")
    assert list(solver.text) == ["", "", "optimizer #3"]
