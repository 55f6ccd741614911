"""AppTest of the Layer redundancy page on the built-in model."""

from __future__ import annotations

import pytest

from tests.apptest import open_app

pytestmark = pytest.mark.slow


def test_scores_page_computes_charts_and_downloads():
    at = open_app("redundancy")
    assert at.title[0].value == "Layer redundancy"
    at.number_input(key="scores_windows").set_value(2)
    at.number_input(key="scores_seqlen").set_value(32)
    at.button[0].click().run()
    assert not at.exception and not at.error
    charts = at.get("plotly_chart")
    assert len(charts) == 6
    assert "Most redundant layers" in at.markdown[0].value
    captions = " ".join(c.value for c in at.caption)
    assert "smollm2-135m" in captions and "2 windows × 32 tokens" in captions
    downloads = [d.proto.label for d in at.get("download_button")]
    assert "Download lr_per_layer.csv" in downloads and "Download weight_outliers.csv" in downloads
    at.selectbox(key="scores_layer").set_value(5).run()
    assert not at.exception
    assert any("token_cosines_layer_5" in label for label in [d.proto.label for d in at.get("download_button")])
