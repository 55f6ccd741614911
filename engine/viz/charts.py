"""Plotly figures and the tables behind them (no streamlit: the report export reuses them).

Every ``*_table`` returns the exact data its figure draws, so a chart can be
downloaded as CSV; every figure takes a ``subtitle`` that states what it was
computed on.
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go

from engine.quant.grid import MAX_BITS, MIN_BITS
from engine.quant.layer_bits import LayerBits
from engine.scores.findings import has_sublayer_cosines
from engine.scores.outliers import WeightOutliers
from engine.scores.ranking import ranks, spearman, zd_importance
from engine.scores.redundancy import HIST_BINS, LayerRedundancy
from engine.viz.style import PALETTE, log_ticks, padded_range, styled, wants_log


def _titled(fig: go.Figure, title: str, subtitle: str, **layout) -> go.Figure:
    return styled(fig, title, subtitle, **layout)


BAR_WIDTH = 0.8  # in layers: a trace holding few, far-apart layers would otherwise get bars as wide as their gaps


def robust_range(values: list[float], pad: float = 0.1) -> tuple[list[float], list[int]]:
    """Axis range over the bulk of ``values`` and the indices left below it.

    Values far from the rest (below ``Q1 − 10·IQR`` or above ``Q3 + 10·IQR``:
    e.g. layer 0's LR of 0.004 when the others sit at 0.76–0.98) are excluded so
    the differences among the rest stay visible; the indices returned are the
    ones below (those above simply leave the top of the plot).
    """
    ordered = sorted(values)
    n = len(ordered)
    q1, q3 = ordered[n // 4], ordered[(3 * n) // 4]
    floor, ceiling = q1 - 10 * (q3 - q1), q3 + 10 * (q3 - q1)
    low_out = [i for i, v in enumerate(values) if v < floor]
    kept = [v for v in values if floor <= v <= ceiling] or values
    return padded_range(kept, pad=pad), low_out


def lr_table(scores: LayerRedundancy) -> pd.DataFrame:
    """Per layer: LR, attention and MLP cosines, LIM and BI."""
    return pd.DataFrame({
        "layer": range(len(scores.lr)), "lr": scores.lr, "attn_cos": scores.attn_cos,
        "mlp_cos": scores.mlp_cos, "lim": scores.lim, "bi": scores.bi,
    })


def position_table(scores: LayerRedundancy) -> pd.DataFrame:
    """Mean cosine per layer (rows) × token position (columns)."""
    frame = pd.DataFrame(scores.position_cos)
    frame.index.name = "layer"
    return frame


def lr_position_heatmap(scores: LayerRedundancy, subtitle: str, robust: bool = False) -> go.Figure:
    """Heatmap of per-token cosine: layer × token position (mean over windows).

    ``robust`` starts the colour scale at the 10th percentile of the cells, so
    the differences among the many similar layers stay visible when one or two
    layers (typically layer 0) sit near 0; such cells then share one colour.
    """
    cells = sorted(v for row in scores.position_cos for v in row if math.isfinite(v))  # a BOS column is NaN
    zmin = cells[len(cells) // 10] if robust else min(0.0, cells[0])
    fig = go.Figure(go.Heatmap(
        z=scores.position_cos, colorscale="Viridis", zmin=zmin,
        zmax=1.0, colorbar={"title": "cosine"},
        hovertemplate="layer %{y}<br>position %{x}<br>cosine %{z:.4f}<extra></extra>",
    ))
    return _titled(fig, "LR cosine per layer × token position", subtitle,
                   xaxis_title="token position", yaxis_title="layer", height=520)


def lr_profile_chart(scores: LayerRedundancy, subtitle: str, zoom: bool = True) -> go.Figure:
    """LR per layer with the attention-only and MLP-only cosines.

    ``zoom``: the y axis spans the bulk of the values; layers far below it
    (typically layer 0, which rewrites the embedding) are named in an
    annotation at the bottom edge instead of flattening the rest.
    """
    layers = list(range(len(scores.lr)))
    fig = go.Figure()
    sublayers = has_sublayer_cosines(scores)  # no empty legend entries for a split the model does not have
    series = (("LR", scores.lr), ("attention", scores.attn_cos), ("MLP", scores.mlp_cos))[: 3 if sublayers else 1]
    for (name, values), colour in zip((("layer (LR)", scores.lr), ("attention block", scores.attn_cos),
                                       ("MLP block", scores.mlp_cos))[: len(series)], PALETTE):
        fig.add_trace(go.Scatter(x=layers, y=values, mode="lines+markers", name=name, line={"color": colour},
                                 marker={"color": colour},
                                 hovertemplate="layer %{x}<br>%{y:.4f}<extra>" + name + "</extra>"))
    _titled(fig, "LR per layer: cosine(input, output)", subtitle,
            xaxis_title="layer", yaxis_title="mean cosine (1 = layer changes nothing)")
    if zoom:
        y_range, below = robust_range([v for _name, values in series for v in values])
        fig.update_yaxes(range=y_range)
        shown = sorted({i % len(layers) for i in below})
        if shown:
            parts = []
            for i in shown:  # every series of that layer the axis leaves out, not only LR
                values = "<br>".join(f"  {name} {values[i]:.3f}" for name, values in series
                                     if values[i] < y_range[0])
                parts.append(f"layer {i}:<br>{values}")
            # one value per line: the chart often sits in half the page, where one long line is cut off
            fig.add_annotation(x=shown[0], y=y_range[0], text="below the axis, " + "<br>".join(parts), align="left",
                               showarrow=True, arrowhead=2, ax=40, ay=-30, xanchor="left", font={"size": 11},
                               bgcolor="rgba(255,255,255,0.8)")
    fig.update_xaxes(range=padded_range(layers, pad=0.02))
    return fig


def outlier_table(outliers: WeightOutliers) -> pd.DataFrame:
    """Per layer × module: ZD fraction, |z| > k count and fraction of the module's weights."""
    rows = []
    k = f"{outliers.k:g}"
    sizes = outliers.sizes or [[None] * len(outliers.modules) for _ in outliers.zd]
    for layer, (zd_row, count_row, size_row) in enumerate(zip(outliers.zd, outliers.outliers, sizes)):
        for module, zd, count, size in zip(outliers.modules, zd_row, count_row, size_row):
            rows.append({"layer": layer, "module": module, "zd": zd, f"count_abs_z_gt_{k}": count,
                         f"fraction_abs_z_gt_{k}": count / size if size else None, "weights": size})
        total = sum(v for v in size_row if v) or None
        rows.append({"layer": layer, "module": "layer (pooled)", "zd": outliers.zd_layer[layer],
                     f"count_abs_z_gt_{k}": outliers.outliers_layer[layer],
                     f"fraction_abs_z_gt_{k}": outliers.outliers_layer[layer] / total if total else None,
                     "weights": total})
    return pd.DataFrame(rows)


OUTLIER_COLOURS = "Blues"  # sequential, light = few outliers, dark = many: monotone in the value


def outlier_heatmap(outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """Heatmap of the fraction of each module's weights with |z| > k: layer × linear module.

    Fractions, not counts, so small k/v matrices compare with the large MLP ones.
    """
    fractions = outliers.fractions()
    fig = go.Figure(go.Heatmap(
        z=[[100 * v for v in row] for row in fractions], x=outliers.modules, colorscale=OUTLIER_COLOURS,
        zmin=0, colorbar={"title": "% of weights"}, customdata=outliers.outliers,
        hovertemplate="layer %{y} · %{x}<br>|z| > " + f"{outliers.k:g}" +
        ": %{z:.3f}% of weights (%{customdata} weights)<extra></extra>",
    ))
    return _titled(fig, f"Weight outliers: % with |z| > {outliers.k:g} per module", subtitle,
                   xaxis_title="module", yaxis_title="layer", height=520)


def zd_chart(outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """ZD (fraction of weights with z > 1, pooled per layer) per layer, on an axis that shows the differences."""
    layers = list(range(len(outliers.zd_layer)))
    fig = go.Figure(go.Scatter(
        x=layers, y=outliers.zd_layer, mode="lines+markers", name="ZD",
        line={"color": PALETTE[3]}, marker={"color": PALETTE[3], "size": 8},
        hovertemplate="layer %{x}<br>ZD %{y:.4f}<extra></extra>",
    ))
    _titled(fig, "ZD per layer (smaller = more important)", subtitle,
            xaxis_title="layer", yaxis_title="fraction of weights with z > 1 (axis not from 0)")
    fig.update_yaxes(range=padded_range(outliers.zd_layer, pad=0.15))
    fig.update_xaxes(range=padded_range(layers, pad=0.02))
    return fig


def rank_table(scores: LayerRedundancy, outliers: WeightOutliers) -> pd.DataFrame:
    """Importance ranks by LIM and by ZD (1 = least important)."""
    return pd.DataFrame({
        "layer": range(len(scores.lr)), "lim": scores.lim, "zd": outliers.zd_layer,
        "lim_rank": ranks(scores.lim), "zd_rank": ranks(zd_importance(outliers.zd_layer)),
    })


def rank_scatter(scores: LayerRedundancy, outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """LIM rank vs ZD rank per layer, with their Spearman correlation and what it means."""
    table = rank_table(scores, outliers)
    rho = spearman(scores.lim, zd_importance(outliers.zd_layer))
    fig = go.Figure(go.Scatter(
        x=table["lim_rank"], y=table["zd_rank"], mode="markers+text", text=table["layer"],
        textposition="top center", marker={"color": PALETTE[0], "size": 9},
        hovertemplate="layer %{text}<br>LIM rank %{x}<br>ZD rank %{y}<extra></extra>",
    ))
    n = len(table)
    fig.add_trace(go.Scatter(x=[1, n], y=[1, n], mode="lines", name="perfect agreement",
                             line={"color": "#999", "dash": "dot"}, hoverinfo="skip"))
    _titled(fig, f"Importance ranks: LIM vs ZD (Spearman ρ = {rho:.2f})",
            f"ρ = {rho:.2f}: {agreement_words(rho)}<br>{subtitle}",
            xaxis_title="LIM rank (1 = least important)", yaxis_title="ZD rank (1 = least important)",
            showlegend=False)
    fig.update_xaxes(range=padded_range([1, n], pad=0.05))
    fig.update_yaxes(range=padded_range([1, n], pad=0.08))
    return fig


def agreement_words(rho: float) -> str:
    """Plain words for a rank correlation: 1 same order, 0 unrelated, −1 opposite."""
    size = abs(rho)
    strength = ("no" if size < 0.1 else "weak" if size < 0.3 else "moderate" if size < 0.6
                else "strong" if size < 0.9 else "near-perfect")
    if strength == "no":
        return "the two orders are unrelated"
    return f"{strength} {'agreement' if rho > 0 else 'disagreement (opposite orders)'}"


def histogram_table(scores: LayerRedundancy, layer: int) -> pd.DataFrame:
    """Token counts per cosine bin for one layer."""
    width = 2.0 / HIST_BINS
    return pd.DataFrame({
        "bin_start": [-1.0 + i * width for i in range(HIST_BINS)],
        "bin_end": [-1.0 + (i + 1) * width for i in range(HIST_BINS)],
        "tokens": scores.histogram[layer],
    })


def token_cosine_histogram(scores: LayerRedundancy, layer: int, subtitle: str) -> go.Figure:
    """Distribution of one layer's per-token cosines (bins of 0.01, empty tails trimmed)."""
    table = histogram_table(scores, layer)
    filled = table[table["tokens"] > 0]
    if not filled.empty:
        table = table.loc[filled.index.min(): filled.index.max()]
    fig = go.Figure(go.Bar(
        x=(table["bin_start"] + table["bin_end"]) / 2, y=table["tokens"], width=2.0 / HIST_BINS,
        marker={"color": PALETTE[0]},
        hovertemplate="cosine ≈ %{x:.3f}<br>%{y} tokens<extra></extra>",
    ))
    return _titled(fig, f"Layer {layer}: per-token cosine distribution", subtitle,
                   xaxis_title="cosine(input, output)", yaxis_title="tokens")


def _name_values_outside(fig: go.Figure, values: list[float], y_range: list[float], yref: str = "y",
                         colour: str = "#222222") -> None:
    """Points a zoomed axis leaves out: their value, written just inside the edge they cross."""
    inset = 0.06 * (y_range[1] - y_range[0])
    for i, value in enumerate(values):
        if value > y_range[1] or value < y_range[0]:
            above = value > y_range[1]
            fig.add_annotation(x=i, y=y_range[1] - inset if above else y_range[0] + inset, yref=yref,
                               text=f"{'↑' if above else '↓'} {value:.3f}", showarrow=False,
                               font={"size": 10, "color": colour}, bgcolor="rgba(255,255,255,0.85)")


def _with_secondary_line(fig: go.Figure, values: list[float], name: str, axis_title: str) -> go.Figure:
    colour = "#222222"
    fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=name,
                             yaxis="y2", line={"color": colour}, marker={"color": colour, "size": 5},
                             hovertemplate="layer %{x}<br>" + name + " %{y:.4f}<extra></extra>"))
    y_range, _below = robust_range(values)
    fig.update_layout(yaxis2={"title": axis_title, "overlaying": "y", "side": "right", "showgrid": False,
                              "range": y_range, "tickformat": ".2f"})
    _name_values_outside(fig, values, y_range, "y2", colour)
    return fig


def schedule_table(fractions: list[float], dims: list[int], hidden_size: int, lr: list[float] | None) -> pd.DataFrame:
    """Per layer: requested slicing fraction, kept dims, achieved fraction, LR."""
    frame = pd.DataFrame({
        "layer": range(len(fractions)), "fraction": fractions, "kept_dims": dims,
        "achieved_fraction": [1 - d / hidden_size for d in dims],
    })
    if lr is not None:
        frame["lr"] = lr
    return frame


def schedule_chart(table: pd.DataFrame, subtitle: str) -> go.Figure:
    """Bars of each layer's slicing fraction (after rounding), with the LR profile if known."""
    fig = go.Figure(go.Bar(
        x=table["layer"], y=table["achieved_fraction"], name="slicing fraction (rounded)",
        marker={"color": PALETTE[0]}, customdata=table[["fraction", "kept_dims"]],
        hovertemplate="layer %{x}<br>sliced %{y:.3f} (asked %{customdata[0]:.3f})<br>"
        "keeps %{customdata[1]} dims<extra></extra>",
    ))
    if "lr" in table:
        _with_secondary_line(fig, table["lr"].tolist(), "LR", "LR cosine (zoomed)")
    _titled(fig, "Per-layer slicing schedule", subtitle, xaxis_title="layer",
            yaxis_title="fraction of residual dims removed")
    fig.update_layout(yaxis_range=[0, max(0.05, float(table["achieved_fraction"].max()) * 1.15)])
    return fig


def bit_map_table(bits: list[int], importance: list[float] | None, label: str) -> pd.DataFrame:
    """Per layer: allocated code bits and the importance score that ordered them."""
    frame = pd.DataFrame({"layer": range(len(bits)), "bits": bits})
    if importance is not None:
        frame[label] = importance
    return frame


BIT_COLOURS = {2: "#B2182B", 3: "#EF8A62", 4: "#67A9CF", 5: "#2166AC", 6: "#1B7837", 7: "#5AAE61", 8: "#542788"}


def bit_map_chart(table: pd.DataFrame, subtitle: str) -> go.Figure:
    """Bars of each layer's bit level (one colour and legend entry per level), importance as a line."""
    fig = go.Figure()
    for bits, group in table.groupby("bits"):
        fig.add_trace(go.Bar(x=group["layer"], y=group["bits"], name=f"{bits} bits", width=BAR_WIDTH,
                             marker={"color": BIT_COLOURS.get(int(bits), "#777777")},
                             hovertemplate="layer %{x}<br>%{y} bits<extra></extra>"))
    if len(table.columns) > 2:
        label = table.columns[2]
        _with_secondary_line(fig, table[label].tolist(), label, f"{label} (higher = more important)")
    _titled(fig, "Per-layer bit allocation", subtitle, xaxis_title="layer", yaxis_title="code bits", barmode="overlay")
    fig.update_layout(yaxis={"range": [0, max(table["bits"]) + 0.5], "dtick": 1})
    return fig


def module_bit_map_table(bits: list[LayerBits], linears: list[str]) -> pd.DataFrame:
    """Per layer: the code bits of each linear (columns in the layer's order), for allocations with a level per
    linear."""
    return pd.DataFrame([{"layer": i, **{name: entry if isinstance(entry, int) else entry.get(name)
                                         for name in linears}}
                         for i, entry in enumerate(bits)])


def module_bit_map_chart(table: pd.DataFrame, subtitle: str) -> go.Figure:
    """Layers × linears, each cell coloured by its level (the bar chart's colours) and labelled with it; the
    colour bar runs from the lowest level used to the highest, not over every level there is."""
    linears = [c for c in table.columns if c != "layer"]
    z = table[linears].T.values.tolist()  # [linear][layer]
    used = [int(b) for row in z for b in row if pd.notna(b)] or [MIN_BITS, MAX_BITS]  # missing linears: gaps
    steps = list(range(min(used), max(used) + 1))
    colours = []
    for k, level in enumerate(steps):  # piecewise constant: one colour per level, never blended
        colour = BIT_COLOURS.get(level, "#777777")
        colours += [[k / len(steps), colour], [(k + 1) / len(steps), colour]]
    fig = go.Figure(go.Heatmap(
        x=table["layer"], y=linears, z=z, zmin=steps[0] - 0.5, zmax=steps[-1] + 0.5, colorscale=colours,
        texttemplate="%{z}", xgap=1, ygap=1,
        colorbar={"title": "code bits", "tickvals": steps, "ticktext": [str(b) for b in steps]},
        hovertemplate="layer %{x}, %{y}: %{z} bits<extra></extra>"))
    _titled(fig, "Bit allocation per linear", subtitle, xaxis_title="layer", yaxis_title="linear")
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(range=[-0.5, len(table) - 0.5], dtick=1 if len(table) <= 32 else None)
    return fig


SENSITIVITY_COLUMN = "measured KL of the drop (nats/token)"


def drop_preview_table(scores: LayerRedundancy | None, by: str, dropped: list[int],
                       kl: list[float] | None = None) -> pd.DataFrame:
    """Per layer: the value the drop is ranked by (LR for custom lists; the measured KL of dropping the block
    alone, ``kl``, for ``by="sensitivity"``) and whether the layer (block) goes."""
    if by == "sensitivity":
        label, values = SENSITIVITY_COLUMN, list(kl or [])
    else:
        label = {"attention": "attention cosine", "mlp": "MLP cosine"}.get(by, "LR")
        values = {"attention": scores.attn_cos, "mlp": scores.mlp_cos}.get(by, scores.lr)
    return pd.DataFrame({"layer": range(len(values)), label: values,
                         "dropped": [i in set(dropped) for i in range(len(values))]})


def drop_preview_chart(table: pd.DataFrame, subtitle: str) -> go.Figure:
    """The ranking value per layer, the layers that go marked in red (kept ones grey).

    A measured KL is drawn on a log axis when it spans a decade (lower = cheaper to drop); scores zoom into
    their bulk (higher = more redundant).
    """
    label = table.columns[1]
    measured = label == SENSITIVITY_COLUMN
    fig = go.Figure()
    for dropped, colour, name in ((False, "#9E9E9E", "kept"), (True, "#D55E00", "dropped")):
        part = table[table["dropped"] == dropped]
        fig.add_trace(go.Bar(x=part["layer"], y=part[label], name=name, marker={"color": colour}, width=BAR_WIDTH,
                             hovertemplate="layer %{x}<br>" + label + " %{y:.4g}<extra>" + name + "</extra>"))
    order = "lower = cheaper to drop" if measured else "higher = more redundant"
    _titled(fig, f"Which layers go: {label.split(' (')[0]} per layer ({order})", subtitle,
            xaxis_title="layer", yaxis_title=label if measured else f"{label} (zoomed)", barmode="overlay")
    values = table[label].tolist()
    if measured and wants_log(values):
        y_range = padded_range(values, log=True)
        ticks, text = log_ticks(y_range)
        fig.update_yaxes(type="log", range=y_range, tickvals=ticks, ticktext=text)
    elif measured:
        fig.update_yaxes(range=[0, max(values) * 1.08 if values and max(values) > 0 else 1])
    else:
        y_range, _below = robust_range(values)
        fig.update_layout(yaxis_range=y_range)
        _name_values_outside(fig, values, y_range)
    return fig
