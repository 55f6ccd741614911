"""One look for every figure, in the app and in exports: explicit colours, fonts, axes with honest ranges.

Figures are drawn with ``st.plotly_chart(fig, theme=None)`` so Streamlit's
theme never replaces these colours; the HTML report embeds the same figure.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import plotly.graph_objects as go

DENSE_COLOUR = "#222222"
PARETO_COLOUR = "#555555"
PALETTE = (  # colour-blind-friendly, distinct on white (Okabe-Ito + Tableau extras)
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#8C564B", "#F0C808",
    "#7F3C8D", "#11A579", "#3969AC", "#E73F74", "#80BA5A", "#E68310", "#008695", "#CF1C90",
)
FIXED_SERIES = {  # the series users meet first keep the same colour everywhere
    "dense": DENSE_COLOUR,
    "constant": "#0072B2",
    "custom": "#8C564B",
}
TEMPLATE = "plotly_white"
FONT = {"family": "Arial, Helvetica, sans-serif", "size": 13, "color": "#222222"}
DECADES_FOR_LOG = 1.0  # log axis only when values span at least one decade


def series_colour(series: str) -> str:
    """A fixed colour per series name: the same in every view, run and export."""
    if series in FIXED_SERIES:
        return FIXED_SERIES[series]
    digest = int(hashlib.sha1(series.encode()).hexdigest(), 16)
    return PALETTE[digest % len(PALETTE)]


def series_colours(names: Iterable[str]) -> dict[str, str]:
    """Colours for several series: fixed ones first, then distinct palette entries (hash order, no clash)."""
    names = list(dict.fromkeys(names))
    out = {n: FIXED_SERIES[n] for n in names if n in FIXED_SERIES}
    used = set(out.values())
    for name in names:
        if name in out:
            continue
        start = int(hashlib.sha1(name.encode()).hexdigest(), 16) % len(PALETTE)
        for step in range(len(PALETTE)):
            colour = PALETTE[(start + step) % len(PALETTE)]
            if colour not in used:
                break
        out[name] = colour
        used.add(colour)
    return out


def wants_log(values: Iterable[float]) -> bool:
    """True when positive ``values`` span at least a decade (then a log axis shows them better)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite or min(finite) <= 0:
        return False
    return math.log10(max(finite) / min(finite)) >= DECADES_FOR_LOG


def padded_range(values: Iterable[float], log: bool = False, pad: float = 0.08,
                 min_span: float | None = None) -> list[float]:
    """Axis range spanning ``values`` with ``pad`` of the span on each side.

    On a log axis the range is returned in log10 units (Plotly's convention).
    A single value (or a tiny span) gets ``min_span`` (default 10% of the
    value, or 1 for 0) so a one-point chart does not zoom into noise.
    """
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if log:
        finite = [math.log10(v) for v in finite if v > 0]
    if not finite:
        return [0.0, 1.0]
    low, high = min(finite), max(finite)
    span = high - low
    floor = min_span if min_span is not None else (0.1 if log else max(abs(high) * 0.1, 1e-9) if high else 1.0)
    if span < floor:
        middle = (low + high) / 2
        low, high, span = middle - floor / 2, middle + floor / 2, floor
    return [low - pad * span, high + pad * span]


LOG_TICK_STEPS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 3, 4, 5, 6, 7, 8, 9))
"""Mantissas of log-axis ticks, sparsest first: a narrow range gets the denser steps."""
MIN_LOG_TICKS = 4
MAX_END_GAP = math.log10(1.5)
"""The most (log10 units) between the bottom of a log axis and its lowest labelled tick: the lowest point, often
dense, has a labelled value within a factor 1.5."""


def _mantissa_ticks(low: float, high: float, steps: tuple) -> list[float]:
    """``m · 10^e`` for every mantissa ``m`` in ``steps`` inside ``[low, high]`` (log10 units)."""
    values = [round(m * 10**e, 12) for e in range(math.floor(low), math.ceil(high) + 1) for m in steps]
    return [v for v in values if low <= math.log10(v) <= high]


def log_ticks(axis_range: list[float]) -> tuple[list[float], list[str]]:
    """Clean tick values on a log axis whose range is in log10 units: powers of 10 past 3 decades; else the
    sparsest of 1-2-5, 1-2-3-5-7 (and, within one decade, every mantissa) that puts at least
    :data:`MIN_LOG_TICKS` ticks inside the range and one within :data:`MAX_END_GAP` of its bottom, else 1-2-5
    with one round value added just above the bottom (a dense perplexity of 34 on an axis up to 500 gets 30, not only
    50); round linear steps under a fifth of a decade."""
    low, high = axis_range
    span = high - low
    candidates = LOG_TICK_STEPS[:1] if span > 3 else LOG_TICK_STEPS[1:] if span <= 1 else LOG_TICK_STEPS[1:3]
    shown: list[float] = []
    for steps in candidates:
        shown = _mantissa_ticks(low, high, steps)
        if len(shown) >= MIN_LOG_TICKS and math.log10(shown[0]) - low <= MAX_END_GAP:
            break
    else:
        if 1 < span <= 3:  # the bottom is still bare: 1-2-5, and one round value just above the bottom
            bottom = 10**low
            half = 10 ** math.floor(math.log10(bottom)) / 2  # half a unit of the leading digit
            first = round(math.ceil(bottom / half) * half, 12)
            shown = [first, *(v for v in _mantissa_ticks(low, high, (1, 2, 5)) if v > first)]
    if len(shown) < 2:  # under a fifth of a decade: evenly spaced round values, as a linear axis would have
        lo, hi = 10**low, 10**high
        step = 10 ** math.floor(math.log10((hi - lo) / 2))
        step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (m * step) <= 5)
        shown = [round(k * step, 12) for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]
    return shown, [f"{v:,.0f}" if v >= 1 and v == round(v) else f"{v:g}" for v in shown]


def styled(fig: go.Figure, title: str, subtitle: str, height: int = 460, **layout) -> go.Figure:
    """Title with a 'computed on' subtitle, the project's template and font, legend below the plot."""
    fig.update_layout(
        template=TEMPLATE, font=FONT, height=height, paper_bgcolor="white", plot_bgcolor="white",
        title={"text": f"{title}<br><sup>{subtitle}</sup>", "x": 0.01, "xanchor": "left"},
        margin={"t": 90, "l": 70, "r": 30, "b": 60},
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0},
        **layout,
    )
    return fig
