"""Trade-off charts over stored runs: quality vs size, dense reference, Pareto frontier, previews marked.

Runs are rows of ``ResultsStore.runs_frame()`` (see ``engine.runs.record``).
Only runs evaluated on the same windows (one ``data_label``) are drawn
together: perplexities from different windows are not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import plotly.graph_objects as go

from engine.methods import method_named
from engine.quant.runtimes import DEFAULT_RUNTIME
from engine.runs.record import ACC_PREFIX
from engine.viz.style import DENSE_COLOUR, PARETO_COLOUR, log_ticks, padded_range, series_colours, styled, wants_log


@dataclass(frozen=True)
class SizeAxis:
    """A size column: its label and whether a *larger* value means a *larger* model."""

    label: str
    larger_is_bigger: bool = True


SIZE_AXES = {
    "metrics.size_fraction": SizeAxis("size (fraction of dense bytes at 16 bits)"),
    "metrics.bytes_16bit": SizeAxis("size (bytes, unquantized parts at 16 bits)"),
    "metrics.param_fraction": SizeAxis("parameters (fraction of dense)"),
    "metrics.achieved_fraction": SizeAxis("average slicing fraction (after rounding)", larger_is_bigger=False),
    "config.low_fraction": SizeAxis("fraction of layers at the low bit level", larger_is_bigger=False),
    "metrics.avg_bits": SizeAxis("average code bits (per layer; per weight for a level per linear)"),
    "metrics.params": SizeAxis("parameters"),
}
KLD = "metrics.kld_mean"
LOWER_IS_BETTER = {"metrics.ppl", KLD}


def size_axes(frame: pd.DataFrame) -> dict[str, str]:
    """Size columns with at least one value in ``frame``: ``{column: label}`` (default first)."""
    return {k: a.label for k, a in SIZE_AXES.items() if k in frame and frame[k].notna().any()}


def quality_axes(frame: pd.DataFrame) -> dict[str, str]:
    """Quality columns present in ``frame``: perplexity and per-task accuracies."""
    axes = {"metrics.ppl": "perplexity"} if "metrics.ppl" in frame and frame["metrics.ppl"].notna().any() else {}
    if KLD in frame and frame[KLD].notna().any():
        axes[KLD] = "KL divergence to dense (mean, nats per token)"
    for column in frame.columns:
        if column.startswith(f"metrics.{ACC_PREFIX}") and frame[column].notna().any():
            axes[column] = f"accuracy: {column.removeprefix(f'metrics.{ACC_PREFIX}')}"
    return axes


def run_runtimes(frame: pd.DataFrame) -> pd.Series:
    """Each run's target runtime (``config.target_runtime``; runs without one, and methods without bits:
    ``research``)."""
    if "config.target_runtime" not in frame:
        return pd.Series(DEFAULT_RUNTIME, index=frame.index)
    return frame["config.target_runtime"].fillna(DEFAULT_RUNTIME).astype(str)


def filter_runs(frame: pd.DataFrame, models=None, methods=None, data_label: str | None = None,
                include_previews: bool = True, fingerprint: str | None = None) -> pd.DataFrame:
    """Rows of ``frame`` matching the given models, methods, evaluation data and weights (None = any)."""
    if frame.empty:
        return frame
    keep = pd.Series(True, index=frame.index)
    if fingerprint is not None:
        keep &= frame["fingerprint"] == fingerprint
    if models is not None:
        keep &= frame["model"].isin(list(models))
    if methods is not None:
        keep &= frame["method"].isin(list(methods))
    if data_label is not None:
        keep &= frame["data_label"] == data_label
    if not include_previews and "preview" in frame:
        keep &= ~frame["preview"].astype(bool)
    return frame[keep]


def data_labels_by_use(frame: pd.DataFrame) -> list[str]:
    """Evaluation-data labels, those holding the most compressed runs first (then dense-only ones)."""
    counts = frame[frame["method"] != "dense"]["data_label"].value_counts()
    return list(counts.index) + sorted(set(frame["data_label"]) - set(counts.index))


def runs_on_other_windows(frame: pd.DataFrame, label: str) -> str:
    """A sentence naming the other evaluation windows ``frame``'s compressed runs were measured on (runs are
    compared only on the same windows), or ``""``."""
    compressed = frame[(frame["method"] != "dense") & (frame["data_label"] != label)] if not frame.empty else frame
    if compressed.empty:
        return ""
    listed = "; ".join(f"{n} on {other}" for other, n in compressed["data_label"].value_counts().items())
    return (f" Compressed runs of this model on other windows: {listed} (choose those windows under "
            "'Calibration and evaluation data' to compare them here).")


def with_method_series(frame: pd.DataFrame) -> pd.DataFrame:
    """Series named ``"<method> · <series>"`` so runs of different methods never share a curve."""
    def name(method: str, series: str) -> str:
        return series if method == "dense" or series.startswith(("drop", method)) else f"{method} · {series}"

    return frame.assign(series=[name(m, s) for m, s in zip(frame["method"], frame["series"])])


def pareto_mask(x: list[float], y: list[float], lower_is_better: bool, larger_is_bigger: bool = True) -> list[bool]:
    """True for points that no other point beats on both size (smaller model) and quality."""
    sx = 1 if larger_is_bigger else -1  # sign so that smaller sx*x means a smaller model
    sy = 1 if lower_is_better else -1
    mask = []
    for i, (xi, yi) in enumerate(zip(x, y)):
        dominated = any(
            (sx * xj <= sx * xi and sy * yj <= sy * yi) and (sx * xj < sx * xi or sy * yj < sy * yi)
            for j, (xj, yj) in enumerate(zip(x, y)) if j != i
        )
        mask.append(not dominated)
    return mask


SERIES_SYMBOLS = ("circle", "diamond", "square", "triangle-up", "triangle-down", "pentagon", "hexagon", "star-square")
"""Marker of the k-th series: two runs with the same numbers (e.g. the same layers dropped by two rankings) stay
both visible where their points coincide."""


def _same_point(points: pd.DataFrame, x: str, y: str) -> dict[int, list[str]]:
    """For each run id, the other runs drawn at exactly the same (x, y): ``["run 12 · drop by LR", ...]``."""
    found: dict[tuple, list[tuple[int, str]]] = {}
    for _, row in points.iterrows():
        found.setdefault((float(row[x]), float(row[y])), []).append((int(row["id"]), str(row["series"])))
    return {run: [f"run {other} · {series}" for other, series in group if other != run]
            for group in found.values() if len(group) > 1 for run, _series in group}


def _hover(row: pd.Series, x: str, y: str, same: list[str] | None = None) -> str:
    parts = [f"run {row['id']} · {row['series']}" + (" (preview)" if row.get("preview") else "")]
    if same:
        parts.append("same point as " + ", ".join(same))
    change = row.get("metrics.ppl_change")
    if y == "metrics.ppl" and pd.notna(change):
        low, high = row.get("metrics.ppl_change_low"), row.get("metrics.ppl_change_high")
        paired = f", paired 95% interval {low:+.1%} to {high:+.1%}" if pd.notna(low) and pd.notna(high) else ""
        parts.append(f"perplexity {row[y]:.4g} ({change:+.1%} vs dense on the same windows{paired})")
    for key in ("config.target", "config.basis", "config.low_bits", "config.ordering", "config.quantizer"):
        if key in row and pd.notna(row[key]):
            parts.append(f"{key.removeprefix('config.')} = {row[key]}")
    return "<br>".join(parts)


def full_series_name(method: str, series: str) -> str:
    """A series as a reader names it: with its method (``slicing, constant``; ``quantization, lim 4/3-bit rtn``)
    unless the series already says it (``drop layers by lr``, ``stacked: ...``)."""
    known = method_named(method)
    words = (method, known.series_word) if known is not None and known.series_word else (method,)
    return series if series.lower().startswith(words) else f"{method}, {series}"


def tradeoff_figure(frame: pd.DataFrame, x: str, y: str, subtitle: str, log_y: bool | None = None) -> go.Figure:
    """Quality ``y`` vs size ``x``: one colour and marker per series, previews hollow and dashed, error bars from the
    bootstrap interval, dense as a black star and dotted reference line, Pareto frontier (over the full
    runs and dense) as a grey step line; a linear quality axis starts at 0 at the lowest.

    ``log_y``: None picks a log axis only when the values span a decade.
    """
    if y == KLD and y in frame:  # dense is the reference: its divergence to itself is 0
        frame = frame.assign(**{KLD: frame[KLD].where(frame["method"] != "dense", 0.0)})
    dense = frame[frame["method"] == "dense"].dropna(subset=[y]) if y in frame else frame.iloc[0:0]
    points = frame[frame["method"] != "dense"].dropna(subset=[x, y]) if {x, y} <= set(frame) else frame.iloc[0:0]
    points = points.sort_values(x)
    axis = SIZE_AXES.get(x, SizeAxis(x))
    lower = y in LOWER_IS_BETTER
    has_ci = y == "metrics.ppl" and {"metrics.ci_low", "metrics.ci_high"} <= set(frame)
    ys = list(points[y]) + list(dense[y])
    if has_ci:
        ys += list(points["metrics.ci_low"].dropna()) + list(points["metrics.ci_high"].dropna())
    log = wants_log(ys) if log_y is None else log_y
    colours = series_colours(points["series"])
    symbols = {name: SERIES_SYMBOLS[k % len(SERIES_SYMBOLS)] for k, name in enumerate(sorted(colours, key=str))}
    same = _same_point(points, x, y)
    fig = go.Figure()
    for (series, preview), group in points.groupby(["series", points["preview"].astype(bool)], sort=True):
        colour = colours[series]
        error = None
        if has_ci:
            error = {"type": "data", "symmetric": False, "color": colour, "thickness": 1,
                     "array": (group["metrics.ci_high"] - group[y]).tolist(),
                     "arrayminus": (group[y] - group["metrics.ci_low"]).tolist()}
        shown = full_series_name(str(group["method"].iloc[0]), str(series))
        fig.add_trace(go.Scatter(
            x=group[x], y=group[y], mode="lines+markers", name=f"{shown} (preview)" if preview else shown,
            line={"color": colour, "dash": "dash" if preview else "solid", "width": 2},
            marker={"color": "white" if preview else colour, "size": 9, "line": {"color": colour, "width": 2},
                    "symbol": symbols[series]},
            error_y=error, text=[_hover(r, x, y, same.get(int(r["id"]))) for _, r in group.iterrows()],
            hovertemplate="%{text}<br>" + f"{axis.label}: %{{x:.4g}}<extra></extra>",
        ))
    xs = list(points[x])
    if not dense.empty:
        reference = float(dense[y].iloc[0])
        dense_x = [v for v in (dense[x] if x in dense else []) if pd.notna(v)]
        xs += dense_x
        x_range = padded_range(xs)
        fig.add_trace(go.Scatter(
            x=x_range, y=[reference, reference], mode="lines", name=f"dense ({reference:.4g})",
            line={"color": DENSE_COLOUR, "dash": "dot", "width": 1.5}, hoverinfo="skip",
        ))
        if dense_x:
            fig.add_trace(go.Scatter(
                x=[dense_x[0]], y=[reference], mode="markers", name="dense model", showlegend=False,
                marker={"color": DENSE_COLOUR, "symbol": "star", "size": 14},
                hovertemplate=f"dense · run {int(dense['id'].iloc[0])}<br>{y.removeprefix('metrics.')} "
                f"{reference:.4g}<extra></extra>",
            ))
    final = points[~points["preview"].astype(bool)] if "preview" in points else points
    if not dense.empty and x in dense:  # dense competes too: a run bigger and worse than dense is on no frontier
        final = pd.concat([final, dense.dropna(subset=[x]).iloc[:1]])
    if len(final) > 1:
        mask = pareto_mask(final[x].tolist(), final[y].tolist(), lower, axis.larger_is_bigger)
        front = final[mask].sort_values(x)
        fig.add_trace(go.Scatter(
            x=front[x], y=front[y], mode="lines", name="Pareto frontier",
            line={"color": PARETO_COLOUR, "width": 6, "shape": "hv" if axis.larger_is_bigger else "vh"},
            opacity=0.25, hoverinfo="skip",
        ))
    quality = {KLD: "KL divergence to dense", "metrics.ppl": "perplexity"}.get(
        y, y.removeprefix("metrics.").replace(ACC_PREFIX, "accuracy: "))
    styled(fig, f"{quality} vs {axis.label}", subtitle, xaxis_title=axis.label,
           yaxis_title=quality + (" (log scale)" if log else ""))
    fig.update_xaxes(range=padded_range(xs), zeroline=False)
    y_range = padded_range(ys, log=log)
    if not log and y_range[0] < 0 <= min(ys, default=0):  # perplexity and accuracy are never negative
        y_range[0] = 0.0
    fig.update_yaxes(type="log" if log else "linear", range=y_range, zeroline=False)
    if log:
        values, labels = log_ticks(y_range)
        fig.update_yaxes(tickvals=values, ticktext=labels)
    if not axis.larger_is_bigger:
        fig.add_annotation(text="smaller model →", xref="paper", yref="paper", x=1, y=1.02, showarrow=False,
                           font={"size": 11, "color": "#666"}, xanchor="right")
    return fig
