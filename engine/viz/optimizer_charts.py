"""Charts of the optimizers: each candidate's predicted damage against what was measured on held-out text."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from engine.viz.style import padded_range, styled

SOURCE_COLOURS = {"optimizer": "#0072B2", "uniform": "#7F7F7F", "ordering": "#E69F00"}


def candidates_chart(table: pd.DataFrame, subtitle: str, predicted: str = "predicted damage",
                     measured: str = "measured ΔNLL") -> go.Figure:
    """Predicted (the solver's sum of per-unit damages) vs measured damage on held-out windows, one marker per
    candidate.

    ``table``: one row per candidate with ``candidate``, ``source``, ``chosen`` and the two columns named;
    the chosen one is a star.  Points on a rising line mean the additive prediction ranks candidates right.
    The solver's candidates often lie on top of each other, so of them only the chosen one (or, when a
    competitor was chosen, the best measured) is labelled; every point names itself on hover.
    """
    fig = go.Figure()
    names = table["candidate"].str.replace(r" \(= .*\)$", "", regex=True)
    solver = table[table["source"] == "optimizer"]
    shown_solver = solver.index[solver["chosen"]].tolist() or solver[measured].nsmallest(1).index.tolist()
    for source, group in table.groupby("source", sort=False):
        labels = [name if source != "optimizer" or i in shown_solver else "" for i, name in names[group.index].items()]
        fig.add_trace(go.Scatter(
            x=group[predicted], y=group[measured], mode="markers+text", name=source,
            text=labels, customdata=names[group.index], textposition="top center",
            marker={"color": SOURCE_COLOURS.get(source, "#333333"), "size": 11,
                    "symbol": ["star" if c else "circle" for c in group["chosen"]],
                    "line": {"color": "black", "width": [2 if c else 0 for c in group["chosen"]]}},
            hovertemplate="%{customdata}<br>" + predicted + " %{x:.4g}<br>" + measured + " %{y:.4g}<extra></extra>"))
    styled(fig, "Candidates: predicted vs measured damage (star = chosen)", subtitle,
           xaxis_title=f"{predicted} (sum over units, nats/token)", yaxis_title=f"{measured} (nats/token)")
    fig.update_xaxes(range=padded_range(table[predicted].tolist(), pad=0.15))
    fig.update_yaxes(range=padded_range(table[measured].tolist(), pad=0.15))
    return fig


def basis_search_chart(grid: pd.DataFrame, checked: pd.DataFrame, subtitle: str) -> go.Figure:
    """Predicted damage of the LR-dynamic schedule over the SB grid (line) and the SB values sliced for real
    (markers at their prediction, hover with the held-out perplexity; star = chosen).

    ``grid``: ``SB``, ``predicted KL``; ``checked``: the candidate table rows with an SB.
    """
    fig = go.Figure(go.Scatter(x=grid["SB"], y=grid["predicted KL"], mode="lines", name="predicted (no slicing)",
                               line={"color": "#0072B2"},
                               hovertemplate="SB %{x:.3f}<br>predicted KL %{y:.4g}<extra></extra>"))
    if len(checked):
        fig.add_trace(go.Scatter(
            x=checked["SB"], y=checked["predicted KL"], mode="markers", name="sliced and checked",
            marker={"color": "#D55E00", "size": 12,
                    "symbol": ["star" if c else "circle" for c in checked["chosen"]]},
            customdata=checked["held-out ppl"],
            hovertemplate="SB %{x:.3f}<br>held-out ppl %{customdata:.2f}<extra></extra>"))
    styled(fig, "Slicing basis search: predicted damage of each SB", subtitle, xaxis_title="slicing basis SB",
           yaxis_title="predicted KL (nats/token)")
    fig.update_xaxes(range=padded_range(grid["SB"].tolist(), pad=0.05))
    fig.update_yaxes(range=padded_range(grid["predicted KL"].tolist(), pad=0.1))
    return fig
