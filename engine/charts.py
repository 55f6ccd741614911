"""Plotly figures and the tables behind them (no streamlit: the report export reuses them).

Every ``*_table`` returns the exact data its figure draws, so a chart can be
downloaded as CSV; every figure takes a ``subtitle`` that states what it was
computed on.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from engine.scores import HIST_BINS, LayerRedundancy, WeightOutliers, ranks, spearman, zd_importance


def _titled(fig: go.Figure, title: str, subtitle: str, **layout) -> go.Figure:
    fig.update_layout(
        title={"text": f"{title}<br><sup>{subtitle}</sup>"}, margin={"t": 80}, **layout
    )
    return fig


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
    cells = sorted(v for row in scores.position_cos for v in row)
    zmin = cells[len(cells) // 10] if robust else min(0.0, cells[0])
    fig = go.Figure(go.Heatmap(
        z=scores.position_cos, colorscale="Viridis", zmin=zmin,
        zmax=1.0, colorbar={"title": "cosine"},
        hovertemplate="layer %{y}<br>position %{x}<br>cosine %{z:.4f}<extra></extra>",
    ))
    return _titled(fig, "LR cosine per layer × token position", subtitle,
                   xaxis_title="token position", yaxis_title="layer", height=520)


def lr_profile_chart(scores: LayerRedundancy, subtitle: str) -> go.Figure:
    """LR per layer with the attention-only and MLP-only cosines."""
    layers = list(range(len(scores.lr)))
    fig = go.Figure()
    for name, values in (("layer (LR)", scores.lr), ("attention block", scores.attn_cos),
                         ("MLP block", scores.mlp_cos)):
        fig.add_trace(go.Scatter(x=layers, y=values, mode="lines+markers", name=name,
                                 hovertemplate="layer %{x}<br>%{y:.4f}<extra>" + name + "</extra>"))
    return _titled(fig, "Layer redundancy: cosine(input, output) per layer", subtitle,
                   xaxis_title="layer", yaxis_title="mean cosine (1 = layer changes nothing)")


def outlier_table(outliers: WeightOutliers) -> pd.DataFrame:
    """Per layer × module: ZD fraction and |z| > k counts, plus pooled per-layer values."""
    rows = []
    for layer, (zd_row, count_row) in enumerate(zip(outliers.zd, outliers.outliers)):
        for module, zd, count in zip(outliers.modules, zd_row, count_row):
            rows.append({"layer": layer, "module": module, "zd": zd, f"count_abs_z_gt_{outliers.k:g}": count})
        rows.append({"layer": layer, "module": "layer (pooled)", "zd": outliers.zd_layer[layer],
                     f"count_abs_z_gt_{outliers.k:g}": outliers.outliers_layer[layer]})
    return pd.DataFrame(rows)


def outlier_heatmap(outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """Heatmap of |z| > k weight counts: layer × linear module."""
    fig = go.Figure(go.Heatmap(
        z=outliers.outliers, x=outliers.modules, colorscale="Magma",
        colorbar={"title": "count"}, customdata=outliers.zd,
        hovertemplate="layer %{y} · %{x}<br>|z| > " + f"{outliers.k:g}" +
        ": %{z}<br>ZD (z > 1): %{customdata:.4f}<extra></extra>",
    ))
    return _titled(fig, f"Weight outliers (|z| > {outliers.k:g}) per layer × module", subtitle,
                   xaxis_title="module", yaxis_title="layer", height=520)


def zd_chart(outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """ZD (fraction of weights with z > 1, pooled per layer) per layer."""
    fig = go.Figure(go.Bar(
        x=list(range(len(outliers.zd_layer))), y=outliers.zd_layer,
        hovertemplate="layer %{x}<br>ZD %{y:.4f}<extra></extra>",
    ))
    return _titled(fig, "ZD score per layer (smaller = more important)", subtitle,
                   xaxis_title="layer", yaxis_title="fraction of weights with z > 1")


def rank_table(scores: LayerRedundancy, outliers: WeightOutliers) -> pd.DataFrame:
    """Importance ranks by LIM and by ZD (1 = least important)."""
    return pd.DataFrame({
        "layer": range(len(scores.lr)), "lim": scores.lim, "zd": outliers.zd_layer,
        "lim_rank": ranks(scores.lim), "zd_rank": ranks(zd_importance(outliers.zd_layer)),
    })


def rank_scatter(scores: LayerRedundancy, outliers: WeightOutliers, subtitle: str) -> go.Figure:
    """LIM rank vs ZD rank per layer, with their Spearman correlation."""
    table = rank_table(scores, outliers)
    rho = spearman(scores.lim, zd_importance(outliers.zd_layer))
    fig = go.Figure(go.Scatter(
        x=table["lim_rank"], y=table["zd_rank"], mode="markers+text", text=table["layer"],
        textposition="top center",
        hovertemplate="layer %{text}<br>LIM rank %{x}<br>ZD rank %{y}<extra></extra>",
    ))
    return _titled(fig, f"Importance ranks: LIM vs ZD (Spearman ρ = {rho:.3f})", subtitle,
                   xaxis_title="LIM rank (1 = least important)",
                   yaxis_title="ZD rank (1 = least important)")


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
        hovertemplate="cosine ≈ %{x:.3f}<br>%{y} tokens<extra></extra>",
    ))
    return _titled(fig, f"Layer {layer}: per-token cosine distribution", subtitle,
                   xaxis_title="cosine(input, output)", yaxis_title="tokens")


def _with_secondary_line(fig: go.Figure, values: list[float], name: str, axis_title: str) -> go.Figure:
    fig.add_trace(go.Scatter(x=list(range(len(values))), y=values, mode="lines+markers", name=name,
                             yaxis="y2", hovertemplate="layer %{x}<br>" + name + " %{y:.4f}<extra></extra>"))
    fig.update_layout(yaxis2={"title": axis_title, "overlaying": "y", "side": "right", "showgrid": False},
                      legend={"orientation": "h", "y": -0.2})
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
        customdata=table[["fraction", "kept_dims"]],
        hovertemplate="layer %{x}<br>sliced %{y:.3f} (asked %{customdata[0]:.3f})<br>"
        "keeps %{customdata[1]} dims<extra></extra>",
    ))
    if "lr" in table:
        _with_secondary_line(fig, table["lr"].tolist(), "LR", "LR cosine")
    return _titled(fig, "Per-layer slicing schedule", subtitle, xaxis_title="layer",
                   yaxis_title="fraction of residual dims removed")


def bit_map_table(bits: list[int], importance: list[float] | None, label: str) -> pd.DataFrame:
    """Per layer: allocated code bits and the importance score that ordered them."""
    frame = pd.DataFrame({"layer": range(len(bits)), "bits": bits})
    if importance is not None:
        frame[label] = importance
    return frame


def bit_map_chart(table: pd.DataFrame, subtitle: str) -> go.Figure:
    """Bars of each layer's bit level, with the importance score as a line."""
    fig = go.Figure(go.Bar(x=table["layer"], y=table["bits"], name="bits",
                           marker={"color": table["bits"], "colorscale": "Viridis"},
                           hovertemplate="layer %{x}<br>%{y} bits<extra></extra>"))
    if len(table.columns) > 2:
        label = table.columns[2]
        _with_secondary_line(fig, table[label].tolist(), label, f"{label} (higher = more important)")
    return _titled(fig, "Per-layer bit allocation", subtitle, xaxis_title="layer", yaxis_title="code bits")
