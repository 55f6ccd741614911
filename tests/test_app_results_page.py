"""AppTest of the Results page."""

from __future__ import annotations

import pytest

from engine.store import ResultsStore
from tests.apptest import open_app

pytestmark = pytest.mark.slow


def test_results_page_lists_runs_draws_tradeoff_and_exports():
    store = ResultsStore()
    data = {"source": "wiki-offline", "split": "evaluation", "n_windows": 3, "seqlen": 48}
    for fraction, ppl in ((1.0, 20.0), (0.9, 26.0), (0.8, 35.0)):
        store.add_run(model="smollm2-135m", model_fingerprint="x", method="dense" if fraction == 1 else "slicing",
                      config={} if fraction == 1 else {"series": "constant", "target": 1 - fraction},
                      data=data, metrics={"ppl": ppl, "param_fraction": fraction}, duration_s=0.5)
    at = open_app("results")
    assert not at.exception
    at.selectbox(key="results_data").set_value("wiki-offline evaluation, 3 × 48").run()
    assert not at.exception
    assert len(at.dataframe[0].value) >= 3
    chart = at.get("plotly_chart")
    assert len(chart) == 1
    labels = [d.proto.label for d in at.get("download_button")]
    assert labels == ["Download runs.csv", "Download HTML report"]
    assert "wiki-offline evaluation, 3 × 48" in " ".join(c.value for c in at.caption)
