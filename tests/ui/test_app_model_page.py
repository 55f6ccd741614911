"""AppTest of the router, sidebar and Model page (tiny model; the built-in model in the slow tier)."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app


@pytest.mark.slow
def test_builtin_model_card_says_it_was_4_bit():
    at = open_app()
    assert at.title[0].value == "Model"
    assert any("4-bit" in info.value for info in at.info)


def test_measures_perplexity_once_per_windows(tiny_app):
    at = open_app()
    at.number_input(key="keep.eval_windows").set_value(2)
    at.number_input(key="keep.eval_seqlen").set_value(64).run()
    assert "Uses 2 windows of 64 tokens (2 asked" in " ".join(c.value for c in at.caption)
    before = len(ResultsStore().runs())
    click(at, "Measure baseline perplexity")
    assert not at.exception and not at.error, at.error
    assert at.metric[0].label == "Perplexity" and float(at.metric[0].value) > 1
    assert len(ResultsStore().runs()) == before + 1
    assert "2 windows × 64 tokens" in " ".join(c.value for c in at.caption)
    click(at, "Measure baseline perplexity")  # the same windows again: shown, not stored twice
    assert len(ResultsStore().runs()) == before + 1
    assert "Already measured" in at.info[-1].value


def _sidebar_and_page():
    """The sidebar with a page body (AppTest drops entrypoint widgets under st.navigation)."""
    from ui.session import require_model
    from ui.sidebar import model_sidebar

    model_sidebar()
    import streamlit as st

    st.title(f"Page for {require_model().source}")


def test_bad_model_source_keeps_the_loaded_model(tiny_app):
    at = AppTest.from_function(_sidebar_and_page, default_timeout=120).run()
    assert at.title[0].value == f"Page for {tiny_app}"
    at.sidebar.text_input[0].set_value("/no/such/model")
    at.sidebar.button[0].click().run()
    assert not at.exception
    assert "Could not find a model" in at.error[0].value
    assert at.title[0].value == f"Page for {tiny_app}"  # still the loaded model
    assert f"Still using {tiny_app}." in [c.value for c in at.caption]
    assert at.sidebar.text_input[0].value == "/no/such/model"  # left to fix
    at.sidebar.text_input[0].set_value(f"  {tiny_app} ")
    at.sidebar.button[0].click().run()
    assert not at.exception and not at.error
    assert at.sidebar.text_input[0].value == str(tiny_app)  # the field names what is loaded
    assert at.sidebar.selectbox(key="model_builtin").value == "(the id or path above)"


def test_a_bad_model_source_is_said_in_the_sidebar_on_every_page(tiny_app):
    """A trial typed a nonsense id on the Results page and clicked Load twice: nothing said anything until the
    Model page was opened. The sidebar, where the id was typed, now says it on any page."""
    at = open_app("results")
    at.sidebar.text_input[0].set_value("nonsense/not-a-model-xyz")
    at.sidebar.button[0].click().run()
    assert not at.exception
    said = [e.value for e in at.sidebar.error]
    assert said and "Could not find a model at 'nonsense/not-a-model-xyz'" in said[0], said
    assert any(c.value.startswith(f"Loaded **{tiny_app}**") for c in at.sidebar.caption)  # still in use


def test_seqlen_beyond_model_maximum_is_refused(tiny_app):
    at = open_app()
    at.number_input(key="keep.eval_seqlen").set_value(9000)
    at.run()
    assert "longer than this model allows" in at.error[0].value
    assert [b.label for b in at.main.button] == ["Verify weights"]  # nothing to run with an impossible seqlen


def test_verify_weights_confirms_an_untouched_model(tiny_app):
    at = open_app()
    click(at, "Verify weights")
    assert "Weights unchanged since load" in at.success[0].value


def test_evaluation_settings_survive_a_page_change(tiny_app):
    at = open_app()
    at.number_input(key="keep.eval_windows").set_value(3).run()
    at.switch_page("pages/slicing.py").run()
    assert at.number_input(key="keep.eval_windows").value == 3
    at.switch_page("pages/model.py").run()
    assert at.number_input(key="keep.eval_windows").value == 3


@pytest.mark.slow  # ~12 s (lm-eval)
def test_unavailable_task_keeps_the_perplexity(tiny_app):
    at = open_app()
    at.number_input(key="keep.eval_windows").set_value(1)
    at.number_input(key="keep.eval_seqlen").set_value(32)
    at.multiselect(key="keep.tasks").set_value(["piqa"]).run()
    click(at, "Measure baseline perplexity")
    assert not at.exception
    assert at.metric[0].label == "Perplexity"
    assert any("piqa" in w.value and "not measured" in w.value for w in at.warning)
    run = ResultsStore().runs()[0]
    assert run.metrics["ppl"] > 1 and "piqa" in run.data["task_error"]


@pytest.mark.slow
def test_zero_shot_task_from_the_model_page_is_stored_with_its_metric():
    at = open_app()
    at.number_input(key="keep.eval_windows").set_value(1)
    at.number_input(key="keep.eval_seqlen").set_value(32)
    at.multiselect(key="keep.tasks").set_value(["layerlab_wiki_lastword"])
    at.number_input(key="keep.task_limit").set_value(5).run()
    click(at, "Measure baseline perplexity")
    assert not at.exception and not at.error, at.error
    assert [m.label for m in at.metric] == ["Perplexity", "layerlab_wiki_lastword (acc)"]
    (run,) = ResultsStore().runs()[:1]
    assert run.metrics["acc_n.layerlab_wiki_lastword"] == 5
    assert 0 <= run.metrics["acc.layerlab_wiki_lastword"] <= 1
    assert run.data["tasks"] == ["layerlab_wiki_lastword"]
