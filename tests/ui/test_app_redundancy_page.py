"""AppTest of the Layer redundancy page."""

from __future__ import annotations

import pytest

from tests.apptest import click, open_app


def _scored(windows=2, seqlen=32):  # each test its own windows: the score cache is shared
    at = open_app("redundancy")
    assert at.title[0].value == "Layer redundancy"
    at.number_input(key="keep.calib_windows").set_value(windows)
    at.number_input(key="keep.calib_seqlen").set_value(seqlen).run()
    assert not at.get("plotly_chart")  # nothing heavy starts without the button
    return click(at, "Compute scores")


def test_scores_page_computes_charts_findings_and_downloads(tiny_app):
    at = _scored(2, 48)
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 6
    findings = " ".join(m.value for m in at.markdown)
    assert "Most redundant layers" in findings and "Spearman ρ" in findings
    captions = " ".join(c.value for c in at.caption)
    assert "2 windows × 48 tokens" in captions
    downloads = [d.proto.label for d in at.get("download_button")]
    assert "lr_per_layer.csv" in downloads and "weight_outliers.csv" in downloads
    at.selectbox(key="scores_layer").set_value(2).run()
    assert not at.exception
    assert "token_cosines_layer_2.csv" in [d.proto.label for d in at.get("download_button")]
    at.run()  # a rerun finds the scores in the cache
    assert any("loaded from the cache" in c.value for c in at.caption)


def test_a_chart_pinned_here_reaches_the_report(tiny_app):
    at = _scored(2, 80)
    click(at, "Pin this chart")
    assert len(at.session_state["report_pins"]) == 1


@pytest.mark.slow
def test_builtin_model_scores_and_charts():
    at = _scored(3, 56)  # windows no other test scores
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 6
    assert "smollm2-135m" in " ".join(c.value for c in at.caption)
