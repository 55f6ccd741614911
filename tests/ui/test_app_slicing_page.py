"""AppTest of the Slicing page: schedule preview, refusals, a run on the trade-off chart."""

from __future__ import annotations

import pytest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, use_small_data


def _preview_caption(at) -> str:
    return next(c.value for c in at.caption if "Achieved mean slicing" in c.value)


def test_schedule_preview_follows_sliders_and_refuses_impossible_schedules(tiny_app):
    at = use_small_data(open_app("slicing"), windows=3, seqlen=48)  # windows no other test scores
    assert not at.exception and not at.error
    # dynamic needs LR scores: a button, never computed on a keystroke
    assert not at.get("plotly_chart")
    click(at, "Compute LR scores")
    assert not at.exception and not at.error
    assert "Per-layer slicing schedule" in at.get("plotly_chart")[0].proto.spec
    assert "asked 0.2500" in _preview_caption(at)
    at.slider(key="keep.slicing_basis").set_value(5).run()
    at.slider(key="keep.slicing_target").set_value(10).run()
    assert "asked 0.1000" in _preview_caption(at)
    assert at.slider(key="keep.slicing_basis").value == 5  # moving SP keeps SB
    at.slider(key="keep.slicing_basis").set_value(20).run()
    assert "cannot exceed the target" in at.error[0].value
    at.radio(key="keep.slicing_schedule").set_value("custom").run()
    at.session_state["slicing_custom"] = {"edited_rows": {1: {"fraction": 1.2}}, "added_rows": [],
                                          "deleted_rows": []}
    at.run()
    assert not at.exception
    assert "layer 1" in at.error[0].value
    assert not [b for b in at.button if b.label.startswith("Run slicing")]  # nothing to run


def test_run_slicing_stores_against_dense_and_charts_the_result(tiny_app):
    at = use_small_data(open_app("slicing"), windows=4, seqlen=32)
    at.radio(key="keep.slicing_schedule").set_value("constant").run()
    at.slider(key="keep.slicing_target").set_value(10).run()
    click(at, "Run slicing")
    assert not at.exception and not at.error, at.error
    assert [m.label for m in at.metric][:2] == ["Perplexity", "Size vs dense (16-bit bytes)"]
    assert "vs dense" in at.metric[0].delta
    sliced = ResultsStore().runs()[0]
    dense = ResultsStore().get_run(sliced.metrics["dense_run"])  # measured (or reused) on the same windows
    assert sliced.method == "slicing" and dense.method == "dense" and dense.data_label == sliced.data_label
    assert any("larger than dense" in w.value for w in at.warning)  # tiny model: shortcuts outweigh 10%
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("perplexity vs size (fraction of dense bytes at 16 bits)" in spec for spec in charts)


@pytest.mark.slow
def test_builtin_rank_deficient_calibration_is_warned():
    at = use_small_data(open_app("slicing"))
    assert "rank-deficient" in at.warning[0].value  # 2 × 32 calibration tokens < hidden size 576
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    assert not at.exception and not at.error, at.error
    # layer 0's LR is near 0 on the built-in model: the dynamic schedule is constant but for layer 0, and the
    # page says why
    assert any("nearly constant: layer 0's LR" in i.value for i in at.info), [i.value for i in at.info]


def test_find_best_schedule_refuses_bad_targets_then_searches_and_runs(tiny_app):
    from engine.runs.store import ResultsStore
    from tests.apptest import click, open_app, use_small_data

    at = use_small_data(open_app("slicing"), windows=4, seqlen=32)
    at.radio(key="keep.slicing_schedule").set_value("best").run()
    at.slider(key="keep.slicing_target").set_value(45).run()  # beyond the largest fraction measured (40%)
    assert any("beyond the largest fraction measured" in e.value for e in at.error)
    at.slider(key="keep.slicing_target").set_value(25)
    at.number_input(key="keep.opt_slice_held_out").set_value(2).run()
    click(at, "Find best schedule")
    assert not at.exception and not at.error, at.error
    summary = next(m.value for m in at.markdown if m.value.startswith("Chosen:"))
    assert "slicings for" in summary and "from window 4" in summary
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("Slicing basis search" in s for s in specs) and any("Per-layer slicing schedule" in s for s in specs)
    click(at, "Run the chosen schedule")
    assert not at.exception and not at.error, at.error
    assert ResultsStore().runs(method="slicing")
