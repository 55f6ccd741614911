"""Self-contained HTML report for stakeholders: summary, compact table, pinned charts with notes, CSV attachment.

The plotly.js bundle is inlined once, so the file opens offline and loads
nothing from other sites; the full run table travels as a CSV attachment
(a ``data:`` link), not inline.  The page is at most 1,100 px wide and every
chart is responsive, so it reads on a laptop without horizontal scrolling.
Each chart's own camera button saves it as a PNG.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from engine.core.models import LOCAL_FILES_ROW, card_values

MAX_WIDTH_PX = 1100


@dataclass
class ReportItem:
    """One pinned chart: title, figure, the sentence saying what it was computed on, its data, a user note."""

    title: str
    figure: go.Figure
    computed_on: str
    table: pd.DataFrame
    note: str = ""
    key: str = ""  # what the chart shows (ui.report_pins.pin_key): two pins never share one


COLUMN_FORMATS = {  # one precision per column, whatever the value (1.000 beside 0.947, not 1 beside 0.9474)
    "size vs dense (16-bit bytes)": "{:.3f}",
    "perplexity": "{:.2f}",
    "change vs dense": "{:+.1%}",
    "KL divergence to dense": "{:.4f}",
    "same top token": "{:.1%}",
    "speed vs dense": "{:.2f}×",  # as the app shows it: 0.93×
}
ACCURACY_FORMAT = "{:.3f}"
SERIES_KEY = (
    "How to read the table: <b>series</b> names the settings. Quantization: <i>ordering high/low-bit quantizer</i>, "
    "e.g. <i>lim 4/3-bit rtn</i> = layers ranked by LIM (how much a layer changes its input; reversed-lim the "
    "opposite, zd by weight outliers, random at random, custom as typed), the less important ones at the low bits, "
    "the rest at the high bits, rounded to nearest (rtn) or by GPTQ; <i>optimizer</i> (<i>per linear</i>) = bits "
    "chosen per layer (per linear) to fit a size budget; <i>for vLLM</i> and the like = made for that runtime's "
    "formats. Slicing: SliceGPT, <i>constant</i> (every layer sliced alike), <i>dynamic SB=…</i> (slicing spread "
    "by LR) or <i>custom</i>. Dropping: <i>drop layers / attention blocks / MLP blocks by …</i> = those removed, "
    "ranked by LR (lr), by a block's own cosine (attention, mlp), by measured sensitivity or as typed (custom); "
    "<i>iterative</i> = re-ranked after each drop. <i>A + B</i> = a stack: A first, then B. <b>size vs dense</b>: "
    "bytes against the same model at 16 bits. <b>change vs dense</b>: perplexity change on the same windows, with "
    "its paired 95% interval. <b>runs in</b>: where the compressed model runs as it is. <b>speed vs dense</b>: "
    "forward-pass time on the machine that measured it, for methods that change shapes (slicing, dropping); – for "
    "quantization, whose speed depends on the runtime's kernels (LayerLab runs dequantized weights).")
REPORT_HIDDEN_CARD_ROWS = ("layout", LOCAL_FILES_ROW)
"""Model-card rows the page shows and the report leaves out: how LayerLab found the layers (not a model fact) and
paths on this machine (meaningless to a reader elsewhere)."""


def _table_html(frame: pd.DataFrame, classes: str = "data") -> str:
    def fmt(value):
        if isinstance(value, (bool, np.bool_)):
            return "yes" if value else "no"
        if isinstance(value, float):
            if value != value:  # NaN: not measured
                return "–"
            return f"{value:.4g}" if abs(value) < 1e6 else f"{value:,.0f}"
        return value

    shown = frame.copy()
    for column in shown.columns:
        pattern = COLUMN_FORMATS.get(column, ACCURACY_FORMAT if column.startswith("accuracy ") else None)
        if pattern is not None:
            shown[column] = [pattern.format(v) if isinstance(v, (int, float, np.number)) and not isinstance(
                v, (bool, np.bool_)) and v == v else v for v in shown[column]]
    shown = shown.map(fmt) if not shown.empty else shown
    return shown.to_html(index=False, border=0, classes=classes, na_rep="–")


def _csv_link(frame: pd.DataFrame, name: str) -> str:
    payload = base64.b64encode(frame.to_csv(index=False).encode()).decode()
    return f"<a download='{html.escape(name)}' href='data:text/csv;base64,{payload}'>{html.escape(name)}</a>"


def build_report(title: str, model_cards: dict[str, dict], items: list[ReportItem], runs: pd.DataFrame,
                 summary: list[str] = (), compact: pd.DataFrame | None = None) -> str:
    """The whole report as one HTML document (UTF-8 text)."""
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{html.escape(title)}</title>",
        f"<style>body{{font-family:Arial,Helvetica,sans-serif;max-width:{MAX_WIDTH_PX}px;margin:2em auto;"
        "padding:0 1em;color:#222;line-height:1.45}"
        "table.data{border-collapse:collapse;font-size:12px;margin:1em 0;max-width:100%}"
        "table.data td,table.data th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
        "table.card td,table.card th{text-align:left}"
        ".scroll{overflow-x:auto;max-width:100%}.meta{color:#555;font-size:13px}.note{background:#f5f7fa;"
        "border-left:3px solid #0072B2;padding:.5em 1em}ul.summary li{margin:.3em 0}"
        ".chart{width:100%}details{margin-bottom:2em}</style></head><body>",
        f"<h1>{html.escape(title)}</h1><p class='meta'>Generated by LayerLab on {created}.</p>",
    ]
    if summary:
        parts.append("<h2>Executive summary</h2><ul class='summary'>"
                     + "".join(f"<li>{html.escape(line)}</li>" for line in summary) + "</ul>")
    if compact is not None and not compact.empty:
        parts.append(f"<h2>Runs at a glance</h2><div class='scroll'>{_table_html(compact)}</div>"
                     f"<p class='meta'>{SERIES_KEY}</p>")
    for number, item in enumerate(items):
        figure = go.Figure(item.figure)
        figure.update_layout(autosize=True, width=None)
        title = figure.layout.title.text or ""
        if title.split("<br>")[0] == item.title:  # the heading above says it: keep only the chart's subtitle
            figure.update_layout(title_text=title.partition("<br>")[2] or None)
        chart = figure.to_html(full_html=False, include_plotlyjs=number == 0, default_width="100%",
                               config={"responsive": True, "displaylogo": False,
                                       "toImageButtonOptions": {"format": "png", "filename": f"chart-{number + 1}"}})
        parts += [f"<h2>{html.escape(item.title)}</h2>"]  # a heading per chart: the report's outline
        if item.note:
            parts.append(f"<p class='note'>{html.escape(item.note)}</p>")
        parts += [
            f"<div class='chart'>{chart}</div>",
            f"<p class='meta'>Computed on: {html.escape(item.computed_on.removeprefix('Computed on: '))}</p>",
            f"<details><summary>Data behind this chart</summary><div class='scroll'>{_table_html(item.table)}"
            "</div></details>",
        ]
    for source, card in model_cards.items():
        card = {key: value for key, value in card.items() if key not in REPORT_HIDDEN_CARD_ROWS}
        card_frame = pd.DataFrame({"property": list(card), "value": card_values(card)})
        parts.append(f"<h2>Model: {html.escape(source)}</h2>{_table_html(card_frame, 'data card')}")
    parts += [f"<h2>All runs</h2><p>{len(runs)} runs with every setting and metric: "
              f"{_csv_link(runs, 'layerlab-runs.csv')} (CSV attachment).</p>", "</body></html>"]
    return "\n".join(parts)
