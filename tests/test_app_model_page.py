"""AppTest of the router, sidebar and Model page."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.store import ResultsStore
from tests.apptest import open_app

pytestmark = pytest.mark.slow


def test_model_page_shows_builtin_card_and_measures_perplexity():
    at = open_app()
    assert at.title[0].value == "Model"
    assert any("4-bit" in info.value for info in at.info)
    at.number_input(key="baseline_windows").set_value(2)
    at.number_input(key="baseline_seqlen").set_value(64)
    before = len(ResultsStore().runs())
    next(b for b in at.button if b.label == "Measure baseline perplexity").click().run()
    assert not at.exception and not at.error, at.error
    assert at.metric[0].label == "Perplexity"
    assert float(at.metric[0].value) > 1
    assert len(ResultsStore().runs()) == before + 1
    assert "2 windows × 64 tokens" in " ".join(c.value for c in at.caption)


def _sidebar_and_page():
    """The sidebar with a page body (AppTest drops entrypoint widgets under st.navigation)."""
    from ui.session import require_model
    from ui.sidebar import model_sidebar

    model_sidebar()
    import streamlit as st

    st.title(f"Page for {require_model().source}")


def test_bad_model_source_keeps_the_loaded_model():
    at = AppTest.from_function(_sidebar_and_page, default_timeout=120).run()
    assert at.title[0].value == "Page for smollm2-135m"
    at.sidebar.text_input[0].set_value("/no/such/model")
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert "Could not find a model" in at.error[0].value
    assert at.title[0].value == "Page for smollm2-135m"  # still the built-in model
    assert "Still using smollm2-135m." in [c.value for c in at.caption]


def test_seqlen_beyond_model_maximum_is_refused():
    at = open_app()
    at.number_input(key="baseline_seqlen").set_value(9000)
    at.run()
    assert "longer than this model allows" in at.error[0].value
    assert [b.label for b in at.button] == ["Verify weights"]  # nothing to run with an impossible seqlen


def test_verify_weights_confirms_an_untouched_model():
    at = open_app()
    next(b for b in at.button if b.label == "Verify weights").click().run()
    assert "Weights unchanged since load" in at.success[0].value


def test_zero_shot_task_from_the_model_page_is_stored_with_its_metric():
    at = open_app()
    at.number_input(key="baseline_windows").set_value(1)
    at.number_input(key="baseline_seqlen").set_value(32)
    at.multiselect(key="baseline_tasks").set_value(["layerlab_wiki_lastword"])
    at.number_input(key="baseline_task_limit").set_value(5).run()
    next(b for b in at.button if b.label == "Measure baseline perplexity").click().run()
    assert not at.exception and not at.error, at.error
    assert [m.label for m in at.metric] == ["Perplexity", "layerlab_wiki_lastword (acc)"]
    (run,) = ResultsStore().runs()[:1]
    assert run.metrics["acc_n.layerlab_wiki_lastword"] == 5
    assert 0 <= run.metrics["acc.layerlab_wiki_lastword"] <= 1
    assert run.data["tasks"] == ["layerlab_wiki_lastword"]
