"""AppTest of the Slicing page: live schedule preview, refusals, a run on the trade-off chart."""

from __future__ import annotations

import pytest

from tests.apptest import open_app, use_small_data

pytestmark = pytest.mark.slow


def test_schedule_preview_follows_sliders_and_refuses_impossible_schedules():
    at = use_small_data(open_app("slicing"), "slicing")
    assert not at.exception and not at.error
    assert "rank-deficient" in at.warning[0].value  # 2 × 32 calibration tokens < hidden size 576
    preview = at.get("plotly_chart")[0]
    assert "Per-layer slicing schedule" in preview.proto.spec
    caption = next(c.value for c in at.caption if "Achieved mean slicing" in c.value)
    assert "asked 0.2500" in caption
    at.slider(key="slicing_target").set_value(10).run()
    assert "asked 0.1000" in next(c.value for c in at.caption if "Achieved mean slicing" in c.value)
    at.radio(key="slicing_schedule").set_value("custom").run()
    at.session_state["slicing_custom"] = {"edited_rows": {3: {"fraction": 1.2}}, "added_rows": [],
                                          "deleted_rows": []}
    at.run()
    assert not at.exception
    assert "layer 3" in at.error[0].value
    assert not [b for b in at.button if b.label == "Run slicing"]  # nothing to run


def test_run_slicing_stores_and_charts_the_result():
    at = use_small_data(open_app("slicing"), "slicing")
    at.slider(key="slicing_target").set_value(10).run()
    next(b for b in at.button if b.label == "Run slicing").click().run()
    assert not at.exception and not at.error, at.error
    assert [m.label for m in at.metric][:2] == ["Perplexity", "Parameters vs dense"]
    assert any("Stored as run" in c.value for c in at.caption)
    charts = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("ppl vs average slicing fraction" in spec for spec in charts)
