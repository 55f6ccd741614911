"""Trade-off curves over stored runs: quality vs size, with the Pareto frontier.

Runs are rows of ``ResultsStore.runs_frame()``.  Only runs evaluated on the
same data (source, split, windows, seqlen) are drawn together, since
perplexities from different windows are not comparable.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

SIZE_AXES = {
    "metrics.param_fraction": "parameters (fraction of dense)",
    "metrics.achieved_fraction": "average slicing fraction (after rounding)",
    "config.low_fraction": "fraction of layers at the low bit level",
    "metrics.avg_bits": "average code bits per layer",
    "metrics.size_fraction": "size in bytes (fraction of dense)",
    "metrics.bytes": "size (bytes)",
    "metrics.params": "parameters",
}
LOWER_IS_BETTER = {"metrics.ppl"}


def quality_axes(frame: pd.DataFrame) -> dict[str, str]:
    """Quality columns present in ``frame``: perplexity and per-task accuracies."""
    axes = {"metrics.ppl": "perplexity"} if "metrics.ppl" in frame else {}
    for column in frame.columns:
        if column.startswith("metrics.acc.") and frame[column].notna().any():
            axes[column] = f"accuracy: {column.removeprefix('metrics.acc.')}"
    return axes


def data_label(row: pd.Series, prefix: str = "data.") -> str:
    """Evaluation data of a run as a label (source, split, windows × seqlen)."""
    source = row.get(f"{prefix}source")
    if not isinstance(source, str):
        return "no perplexity data"
    return f"{source} {row.get(f'{prefix}split')}, {row.get(f'{prefix}n_windows')} × {row.get(f'{prefix}seqlen')}"


def with_labels(frame: pd.DataFrame) -> pd.DataFrame:
    """Add ``data_label`` and ``series`` (method and schedule/ordering) columns."""
    frame = frame.copy()
    frame["data_label"] = [data_label(row) for _, row in frame.iterrows()]
    series = frame.get("config.series", pd.Series([None] * len(frame), index=frame.index))
    frame["series"] = [s if isinstance(s, str) else m for s, m in zip(series, frame["method"])]
    return frame


def pareto_mask(x: list[float], y: list[float], lower_is_better: bool) -> list[bool]:
    """True for points no other point beats on both smaller x and better y."""
    sign = 1 if lower_is_better else -1
    mask = []
    for i, (xi, yi) in enumerate(zip(x, y)):
        dominated = any(
            (xj <= xi and sign * yj <= sign * yi) and (xj < xi or sign * yj < sign * yi)
            for j, (xj, yj) in enumerate(zip(x, y)) if j != i
        )
        mask.append(not dominated)
    return mask


def tradeoff_figure(frame: pd.DataFrame, x: str, y: str, subtitle: str) -> go.Figure:
    """Scatter+lines of ``y`` vs ``x`` per series; dense baseline line; Pareto frontier."""
    frame = with_labels(frame)
    dense = frame[frame["method"] == "dense"]
    frame = frame.dropna(subset=[x, y]).sort_values(x)
    lower = y in LOWER_IS_BETTER
    fig = go.Figure()
    for series, group in frame.groupby("series", sort=True):
        settings = group.apply(_settings_text, axis=1)
        fig.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="lines+markers", name=str(series), text=settings,
            hovertemplate="%{text}<br>" + f"{SIZE_AXES.get(x, x)}: %{{x:.4g}}<br>{y}: %{{y:.4g}}<extra></extra>",
        ))
    if not dense.empty and y in dense and dense[y].notna().any():
        fig.add_hline(y=float(dense[y].dropna().iloc[0]), line_dash="dot", annotation_text="dense baseline")
    if len(frame) > 1:
        mask = pareto_mask(frame[x].tolist(), frame[y].tolist(), lower)
        front = frame[mask]
        fig.add_trace(go.Scatter(
            x=front[x], y=front[y], mode="markers", name="Pareto frontier",
            marker={"symbol": "circle-open", "size": 16, "line": {"width": 2, "color": "black"}},
            hoverinfo="skip",
        ))
    fig.update_layout(
        title={"text": f"{y.removeprefix('metrics.')} vs {SIZE_AXES.get(x, x)}<br><sup>{subtitle}</sup>"},
        xaxis_title=SIZE_AXES.get(x, x), yaxis_title=y.removeprefix("metrics."), margin={"t": 80},
    )
    if lower:
        fig.update_yaxes(type="log")
    return fig


def _settings_text(row: pd.Series) -> str:
    parts = [f"run {row['id']} · {row['method']}"]
    parts += [f"{c.removeprefix('config.')}={row[c]}" for c in row.index
              if c.startswith("config.") and pd.notna(row[c]) and c != "config.series"]
    return "<br>".join(parts)
