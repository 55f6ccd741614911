"""AppTest of the Results page: runs, trade-off chart, report builder; runs on different files kept apart."""

from __future__ import annotations

import plotly.io

from engine.runs.store import ResultsStore
from tests.apptest import open_app
from tests.apptest import plotly_values as _values

DATA = {"source": "wiki-offline", "split": "evaluation", "n_windows": 3, "seqlen": 48,
        "label": "wiki-offline evaluation, 3 windows × 48 tokens"}


def _figure(at):
    return plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)


def _model_box(at):
    """The page's Model selectbox (its key names the model it opened on)."""
    return next(box for box in at.selectbox if box.label == "Model")


def _results_of_tiny(model: str = "tiny"):
    """The Results page on ``model``'s runs (:func:`_add` stores "tiny"'s; the page opens on the loaded model)."""
    at = open_app("results")
    _model_box(at).set_value(model).run()
    return at


def _add(store, method, series, data, fraction, ppl):
    store.add_run(model="tiny", model_fingerprint="x", method=method,
                  config={"series": series, "preview": False}, data=data,
                  metrics={"ppl": ppl, "ci_low": ppl * 0.9, "ci_high": ppl * 1.1, "size_fraction": fraction,
                           "param_fraction": fraction}, duration_s=0.5)


def test_results_page_lists_runs_draws_tradeoff_and_builds_the_report(tiny_app):
    store = ResultsStore()
    _add(store, "dense", "dense", DATA, 1.0, 20.0)
    for fraction, ppl in ((0.9, 26.0), (0.8, 35.0)):
        _add(store, "slicing", "constant", DATA, fraction, ppl)
    at = _results_of_tiny()
    assert not at.exception
    at.selectbox(key="results_data").set_value(DATA["label"]).run()
    assert not at.exception
    runs_table = next(d.value for d in at.dataframe if "method" in d.value.columns)  # not the interrupted list
    assert len(runs_table) >= 3
    fig = _figure(at)
    names = [t.name for t in fig.data]
    assert "slicing, constant" in names and any(n and n.startswith("dense") for n in names)
    assert fig.layout.yaxis.type == "linear"  # 20..35 spans less than a decade
    labels = [d.proto.label for d in at.get("download_button")]
    assert "Download runs.csv" in labels and "Download HTML report" in labels
    summary = " ".join(m.value for m in at.markdown)
    assert "Dense model: perplexity 20.00" in summary


def test_runs_on_two_uploaded_files_are_never_one_series(tiny_app, tmp_path):
    from engine.core.data import DataSpec

    store = ResultsStore()
    first, second = tmp_path / "a" / "notes.txt", tmp_path / "b" / "notes.txt"  # same name, different text
    for path, text in ((first, "alpha " * 50), (second, "beta " * 50)):
        path.parent.mkdir()
        path.write_text(text)
    labels = []
    for path, ppl in ((first, 30.0), (second, 40.0)):
        spec = DataSpec("file", "evaluation", 48, 3, str(path))
        labels.append(spec.label())
        data = {**spec.to_dict(), "n_windows": 3}  # no stored label: the record builds it from the path
        _add(store, "slicing", "constant", data, 0.9, ppl)
        _add(store, "slicing", "constant", data, 0.8, ppl * 1.2)
    assert labels[0] != labels[1] and "notes.txt#" in labels[0]
    frame = store.runs_frame()
    assert set(labels) <= set(frame["data_label"].unique())
    at = _results_of_tiny()
    assert set(labels) <= set(at.selectbox(key="results_data").options)
    at.selectbox(key="results_data").set_value(labels[0]).run()
    fig = _figure(at)
    points = [float(y) for t in fig.data if t.name == "slicing, constant" for y in _values(t.y)]
    assert sorted(points) == [30.0, 36.0]  # only the first file's runs
    table = next(d.value for d in at.dataframe if "perplexity" in d.value.columns)  # the table follows the windows
    assert sorted(table["perplexity"]) == [30.0, 36.0]
    assert any(f"Runs on {labels[0]} (2 of " in c.value for c in at.caption)


def test_results_summary_compares_only_matched_sizes_and_calls_out_costly_options(tiny_app):
    from tests.runs.test_summary import LABEL
    from tests.runs.test_summary import _add as add_paired

    store = ResultsStore()
    add_paired(store, "dense", "dense", 1.0, 0.0)
    add_paired(store, "quantization", "lim 4/3-bit rtn", 0.40, 0.30)  # +35%: sizes 40% and 89% are not matched
    add_paired(store, "dropping", "drop 2 layers by LR", 0.89, 0.60)
    at = _results_of_tiny("m")  # test_summary's runs
    at.selectbox(key="results_data").set_value(LABEL).run()
    assert not at.exception
    summary = " ".join(m.value for m in at.markdown)
    assert "No matched sizes yet" in summary and " is better " not in summary
    assert "Every compressed option here costs more than +10%" in summary
    at.number_input(key="keep.cost_threshold").set_value(50.0).run()
    summary = " ".join(m.value for m in at.markdown)
    assert "Recommended: quantization · lim 4/3-bit rtn" in summary and "Not recommended" in summary


def test_pins_with_equal_titles_are_kept_apart_and_can_be_reordered(tiny_app):
    """Pins are keyed by what they show: three charts with the same title are three pins, each with its note."""
    import plotly.graph_objects as go

    from engine.viz.report import build_report
    from ui.report_pins import pin_key

    figures = [go.Figure(go.Scatter(x=[1, 2], y=[v, v + 1]), layout={"title": {"text": "ppl vs size"}})
               for v in (1, 2, 3)]
    keys = {pin_key(f, "Computed on: data") for f in figures}
    assert len(keys) == 3 and pin_key(figures[0], "Computed on: data") == pin_key(figures[0], "Computed on: data")
    assert pin_key(figures[0], "Computed on: other windows") != pin_key(figures[0], "Computed on: data")
    from engine.viz.report import ReportItem

    items = [ReportItem("ppl vs size", f, "Computed on: data", _empty_frame(), note=f"note {i}", key=pin_key(f, "d"))
             for i, f in enumerate(figures)]
    text = build_report("LayerLab report: m (2026-12-06)", {}, items, _empty_frame())
    assert text.count("<h2>ppl vs size</h2>") == 3 and all(f"note {i}" in text for i in range(3))
    assert "Computed on: Computed on:" not in text


def _empty_frame():
    import pandas as pd

    return pd.DataFrame()


def test_a_run_left_mid_way_is_said_once_listed_as_interrupted_and_forgotten_on_request(tiny_app):
    """The running mark a page left behind (its script stopped mid-run): the next page says so with how far it
    got and stores it as interrupted (no run); a cancelled one is only said; the list can be cleared."""
    from ui.widgets import RUNNING

    ResultsStore().clear_interrupted()  # a browser test before this one in the same worker may have left one
    at = open_app("results")
    runs = [r.id for r in ResultsStore().runs()]
    at.session_state[RUNNING] = {"label": "Slicing", "page": "Slicing", "started": "10:00:00", "model": "tiny",
                                 "completed": "layers: 2/4"}
    at.run()
    assert any("stopped before it finished, at layers: 2/4" in w.value for w in at.warning)
    stopped = ResultsStore().interrupted()
    assert stopped[["label", "page", "completed"]].values.tolist() == [["Slicing", "Slicing", "layers: 2/4"]]
    assert [r.id for r in ResultsStore().runs()] == runs
    assert any(e.label.startswith("Interrupted computations (1)") for e in at.expander)
    at.run()
    assert not any("stopped before it finished" in w.value for w in at.warning)  # said once
    at.session_state[RUNNING] = {"label": "Slicing", "page": "Slicing", "started": "10:01:00", "cancelled": True}
    at.run()
    assert any("Cancelled: Slicing" in i.value for i in at.info) and len(ResultsStore().interrupted()) == 1
    next(b for b in at.button if b.label == "Forget interrupted computations").click().run()
    assert ResultsStore().interrupted().empty and not any("Cancel" in b.label for b in at.sidebar.button)


def test_a_model_that_came_quantized_says_so_in_the_summary_the_report_carries(tiny_app, monkeypatch):
    """The built-in models were 4-bit before LayerLab got them: the Model page said so, the report did not."""
    import ui.session as session

    real = session.load_model

    def noted(*args, **kwargs):
        loaded = real(*args, **kwargs)
        loaded.note = "Its weights were already 4-bit before LayerLab loaded them."
        return loaded

    monkeypatch.setattr(session, "load_model", noted)
    session._cached_model.clear()
    try:
        store = ResultsStore()
        for method, series, fraction, ppl in (("dense", "dense", 1.0, 20.0), ("slicing", "constant", 0.8, 30.0)):
            store.add_run(model=str(tiny_app), model_fingerprint="x", method=method,
                          config={"series": series, "preview": False}, data=DATA,
                          metrics={"ppl": ppl, "size_fraction": fraction}, duration_s=0.5)
        at = open_app("results")
        at.selectbox(key="results_data").set_value(DATA["label"]).run()
        assert not at.exception
        summary = next(m.value for m in at.markdown if m.value.startswith("- Dense model"))
        assert f"About {tiny_app}: Its weights were already 4-bit" in summary
    finally:
        session._cached_model.clear()  # later tests load the model without the note


def test_results_show_one_model_at_a_time_opening_on_the_loaded_one(tiny_app):
    """A trial loaded Gemma-3 after a SmolLM2 run: Results opened on both models' runs, the summary quoted
    SmolLM2's dense perplexity beside "About gemma3-270m", and the report's title named both. Now one model is
    shown at a time, the loaded one first, even when another model has the latest run."""
    store = ResultsStore()
    for model, dense, sliced in ((str(tiny_app), 20.0, 26.0), ("other-model", 50.0, 70.0)):
        _add_for(store, model, "dense", 1.0, dense)
        _add_for(store, model, "slicing", 0.8, sliced)
    at = open_app("results")
    at.selectbox(key="results_data").set_value(OWN["label"]).run()
    assert not at.exception
    assert _model_box(at).value == str(tiny_app)
    assert {str(tiny_app), "other-model"} <= set(_model_box(at).options)
    summary = " ".join(m.value for m in at.markdown)
    assert "Dense model: perplexity 20.00" in summary and "50.00" not in summary
    assert "other-model" not in _figure(at).layout.title.text
    runs_table = next(d.value for d in at.dataframe if "method" in d.value.columns)
    assert sorted(runs_table["perplexity"]) == [20.0, 26.0]
    _model_box(at).set_value("other-model").run()
    at.selectbox(key="results_data").set_value(OWN["label"]).run()
    summary = " ".join(m.value for m in at.markdown)
    assert "Dense model: perplexity 50.00" in summary and "20.00" not in summary


OWN = {**DATA, "n_windows": 5, "label": "wiki-offline evaluation, 5 windows × 48 tokens"}  # this test's runs only


def _add_for(store, model, method, fraction, ppl):
    store.add_run(model=model, model_fingerprint="x", method=method,
                  config={"series": method if method == "dense" else "constant", "preview": False}, data=OWN,
                  metrics={"ppl": ppl, "ci_low": ppl * 0.9, "ci_high": ppl * 1.1, "size_fraction": fraction,
                           "param_fraction": fraction}, duration_s=0.5)


def test_results_follow_the_sidebar_when_another_model_is_loaded(tiny_app, tmp_path):
    import shutil

    other = str(shutil.copytree(tiny_app, tmp_path / "second-model"))
    store = ResultsStore()
    for model, dense in ((str(tiny_app), 20.0), (other, 60.0)):
        _add_for(store, model, "dense", 1.0, dense)
        _add_for(store, model, "slicing", 0.8, dense * 1.3)
    at = open_app("results")
    assert _model_box(at).value == str(tiny_app)
    at.sidebar.text_input[0].set_value(other)
    at.sidebar.button[0].click().run()
    assert not at.exception and _model_box(at).value == other
    at.selectbox(key="results_data").set_value(OWN["label"]).run()
    assert "Dense model: perplexity 60.00" in " ".join(m.value for m in at.markdown)
