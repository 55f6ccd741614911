"""The HTML report: summary and compact table first, pinned charts with notes, no external loads, laptop width."""

from __future__ import annotations

import re
from html import escape

import pandas as pd

from engine.core.models import LOCAL_FILES_ROW
from engine.runs.summary import compact_table, executive_summary
from engine.viz.report import MAX_WIDTH_PX, ReportItem, build_report
from engine.viz.tradeoff import tradeoff_figure

DATA = {"source": "wiki-offline", "split": "evaluation", "n_windows": 4, "seqlen": 128,
        "label": "wiki-offline evaluation, 4 windows × 128 tokens"}


def _runs(store):
    for method, series, size, ppl, overlaps in (("dense", "dense", 1.0, 20.0, None),
                                                 ("slicing", "constant", 0.9, 30.0, False),
                                                 ("slicing", "constant", 0.7, 45.0, False),
                                                 ("quantization", "lim 4/3-bit rtn", 0.3, 21.0, True)):
        metrics = {"ppl": ppl, "ci_low": ppl * 0.9, "ci_high": ppl * 1.1, "size_fraction": size}
        if method != "dense":
            metrics.update({"ppl_change": ppl / 20 - 1, "ci_overlaps_dense": overlaps, "dense_ppl": 20.0})
        store.add_run(model="m", model_fingerprint="f", method=method, config={"series": series, "preview": False},
                      data=DATA, metrics=metrics, duration_s=1.0)
    return store.runs_frame()


def test_report_with_three_pinned_charts_is_self_contained_and_fits_a_laptop(store):
    runs = _runs(store)
    figure = tradeoff_figure(runs, "metrics.size_fraction", "metrics.ppl", "test data")
    items = [ReportItem(f"chart {i}", figure, "test data", pd.DataFrame({"x": [1.0]}), note=f"note {i}")
             for i in range(3)]
    summary = executive_summary(runs, DATA["label"])
    html = build_report("Report", {"m": {"layers": 30}}, items, runs, summary, compact_table(runs))
    assert html.startswith("<!DOCTYPE html>")
    assert html.count("Plotly.newPlot") >= 3 and html.count("plotly.js v") <= 2  # bundle inlined once
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)\s*=\s*[\"']?(https?:)?//", html)
    assert f"max-width:{MAX_WIDTH_PX}px" in html and MAX_WIDTH_PX <= 1200
    assert html.index("Executive summary") < html.index("Runs at a glance") < html.index("chart 0")
    assert "note 2" in html and "layerlab-runs.csv" in html and "data:text/csv;base64," in html
    assert "None" not in html.split("Runs at a glance")[1].split("</table>")[0]
    assert "1.5679e+08" not in html


def test_compact_table_puts_stakeholder_columns_first(store):
    table = compact_table(_runs(store))
    assert list(table.columns[:6]) == ["run", "method", "series", "preview", "size vs dense (16-bit bytes)",
                                       "perplexity"]
    assert table.shape[1] <= 12
    dense = table[table["method"] == "dense"].iloc[0]
    assert dense["change vs dense"] == 0.0  # dense against itself, not an empty cell
    assert table[table["method"] != "dense"]["change vs dense"].notna().all()


def test_report_tables_read_like_the_app(store):
    compact = pd.DataFrame({"run": [2, 3], "preview": [False, True], "speed vs dense": [0.9254, float("nan")],
                            "change vs dense": [0.52, float("nan")]})
    html_text = build_report("t", {"m": {"parameters": 134515008, "layers": 30}}, [], _runs(store), compact=compact)
    assert "134,515,008" in html_text and ">30<" in html_text  # the model card
    assert "0.93×" in html_text and "+52.0%" in html_text and "0.9254" not in html_text
    assert ">no<" in html_text and ">yes<" in html_text and ">False<" not in html_text


def test_report_table_keeps_one_precision_per_column(store):
    runs = _runs(store)
    html_text = build_report("t", {}, [], runs, compact=compact_table(runs))
    table = html_text.split("Runs at a glance")[1].split("</table>")[0]
    cells = re.findall(r"<td>([^<]*)</td>", table)
    assert "1.000" in cells and "0.900" in cells and "0.300" in cells  # sizes: three decimals, dense too
    assert "20.00" in cells and "45.00" in cells  # perplexity: two decimals
    assert "0.9" not in cells and "45" not in cells  # not one precision per value


def test_every_run_says_where_its_model_runs(store):
    """The table's "runs in": recorded by runs (the runner asks the method), read from the config for runs stored
    before that; a sliced model needs LayerLab's modelling file, a model without whole layers runs as it is, a
    quantization run where its target runtime runs it (the research grid: nowhere as is)."""
    for method, config in (("slicing", {"series": "constant"}),
                           ("dropping", {"series": "drop layers by lr", "block": "layer"}),
                           ("dropping", {"series": "drop attention by lr", "block": "attention"}),
                           ("quantization", {"series": "lim 8/4-bit rtn", "target_runtime": "vllm"}),
                           ("quantization", {"series": "lim 4/2-bit rtn"}),
                           ("quantization", {"series": "recorded", "runs_in": "somewhere recorded"})):
        store.add_run(model="m", model_fingerprint="f", method=method, config=config, data=DATA,
                      metrics={"ppl": 30.0, "size_fraction": 0.5}, duration_s=1.0)
    table = compact_table(_runs(store)).set_index("series")
    assert set(table.loc["constant", "runs in"]) == {"transformers + LayerLab's modelling file"}
    assert table.loc["drop layers by lr", "runs in"].startswith("transformers, vLLM")
    assert table.loc["drop attention by lr", "runs in"].startswith("transformers + LayerLab's modelling file")
    assert table.loc["lim 8/4-bit rtn", "runs in"] == "vLLM (compressed-tensors)"
    assert table.loc["lim 4/2-bit rtn", "runs in"] == "LayerLab research grid (not deployable as is)"
    assert table.loc["recorded", "runs in"] == "somewhere recorded"
    assert table.loc["dense", "runs in"] == "anywhere its family runs"


def test_runs_in_reads_stacks_and_never_fails_on_odd_configs(store):
    """Stacked rows keep their stages as JSON text in the table; an unknown runtime key (a run from another
    version) is shown as the research grid rather than breaking the Results page and the report."""
    stages = [{"method": "dropping", "block": "layer", "series": "drop 1"},
              {"method": "quantization", "quantizer": "llama.cpp", "file_bytes": 123, "bits": [4],
               "quantizer_spec": {"method": "llama.cpp", "bits": 4}}]  # as a stack records it
    for method, config in (("stacked", {"series": "stack to gguf", "stages": stages}),
                           ("stacked", {"series": "sliced stack", "stages": [{"method": "slicing"}, stages[1]]}),
                           ("quantization", {"series": "odd", "target_runtime": "no-such-runtime"}),
                           ("quantization", {"series": "ggml", "quantizer": "llama.cpp", "file_bytes": None})):
        store.add_run(model="m", model_fingerprint="f", method=method, config=config, data=DATA,
                      metrics={"ppl": 30.0, "size_fraction": 0.5}, duration_s=1.0)
    table = compact_table(store.runs_frame()).set_index("series")["runs in"]
    assert table["stack to gguf"] == "llama.cpp (GGUF)"
    assert table["sliced stack"].startswith("nowhere as one file")
    assert table["odd"] == "LayerLab research grid (not deployable as is)"
    assert table["ggml"] == "llama.cpp's types (no GGUF writer here)"


def test_report_explains_its_series_names_and_columns_and_leaves_out_internal_card_rows(store):
    """A stakeholder read "lim 4/3-bit rtn", "speed vs dense –" and "layout: table: a family LayerLab knows" with no
    key: the report now says how to read them, and leaves the layout row (how LayerLab found the layers) out."""
    runs = _runs(store)
    card = {"source": "m", "layout": "table: a family LayerLab knows (its architecture table)", "layers": 30,
            "weights as loaded": "already 4-bit"}
    html = build_report("Report", {"m": card}, [], runs, [], compact_table(runs))
    key = html.split("Runs at a glance")[1].split("</p>")[0]
    assert "lim 4/3-bit rtn" in key and "speed vs dense" in key and "runs in" in key
    model = html.split("Model: m")[1]
    assert "layout" not in model and "already 4-bit" in model and ">30<" in model


def test_report_leaves_out_paths_on_this_machine_and_says_a_chart_title_once(store):
    """A trial's report showed the licence row's local path (/work/.../GEMMA_TERMS.html) and every chart's title
    twice (the heading, then the chart's own): paths stay in the app, and the chart keeps only its subtitle."""
    runs = _runs(store)
    card = {"license": "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            LOCAL_FILES_ROW: "/somewhere/site-packages/pkg/data/GEMMA_TERMS.html"}
    figure = tradeoff_figure(runs, "metrics.size_fraction", "metrics.ppl", "test data")
    heading = figure.layout.title.text.split("<br>")[0]
    html = build_report("Report", {"m": card}, [ReportItem(heading, figure, "test data", pd.DataFrame())], runs)
    model = html.split("Model: m")[1]
    assert "ai.google.dev/gemma/terms" in model and "/somewhere" not in html and LOCAL_FILES_ROW not in html
    assert "data card\"" in model  # text rows, left-aligned (table.card)
    assert html.count(escape(heading)) == 1 and "test data" in html.split("<h2>")[1]  # heading; chart: subtitle
