"""Trade-off figures: honest axes on linear and log scales, fixed colours, previews, Pareto direction."""

from __future__ import annotations

import math

import pytest

from engine.viz.style import log_ticks, padded_range, series_colour, series_colours
from engine.viz.tradeoff import pareto_mask, quality_axes, tradeoff_figure

DATA = {"source": "wiki-offline", "split": "evaluation", "n_windows": 4, "seqlen": 128,
        "label": "wiki-offline evaluation, 4 windows × 128 tokens"}


def _frame(store, points, preview=False):
    for method, series, fraction, ppl in points:
        store.add_run(model="m", model_fingerprint="f", method=method,
                      config={"series": series or method, "preview": preview, "low_fraction": 1 - fraction},
                      data=DATA, metrics={"ppl": ppl, "ci_low": ppl * 0.95, "ci_high": ppl * 1.05,
                                          "size_fraction": fraction, "acc.layerlab_wiki_lastword": 1 / ppl},
                      duration_s=1.0)
    return store.runs_frame()


BASIC = [("dense", None, 1.0, 20.0), ("slicing", "constant", 0.9, 30.0), ("slicing", "constant", 0.8, 45.0),
         ("slicing", "dynamic SB=0.1", 0.8, 40.0), ("slicing", "dynamic SB=0.1", 0.9, 33.0)]


def _axis_range(fig, axis):
    return list(fig.layout[axis].range)


def _inside(fig, axis: str, values, log: bool) -> bool:
    low, high = _axis_range(fig, axis)
    return all(low <= (math.log10(v) if log else v) <= high for v in values if v is not None)


def test_pareto_mask_respects_which_way_is_smaller():
    assert pareto_mask([1, 2, 3, 2], [10, 5, 1, 6], lower_is_better=True) == [True, True, True, False]
    assert pareto_mask([1, 2, 3], [0.5, 0.4, 0.6], lower_is_better=False) == [True, False, True]
    # x = fraction of layers at low bits: larger x is a *smaller* model
    assert pareto_mask([0.25, 0.5, 0.75], [25, 30, 28], True, larger_is_bigger=False) == [True, False, True]


def test_linear_axis_spans_the_data_with_padding_and_dense(store):
    frame = _frame(store, BASIC)
    assert set(quality_axes(frame)) == {"metrics.ppl", "metrics.acc.layerlab_wiki_lastword"}
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "test data")
    assert fig.layout.yaxis.type == "linear"  # 19..47 is less than a decade
    low, high = _axis_range(fig, "yaxis")
    assert low < 20 * 0.95 and high > 45 * 1.05 and high < 60  # data plus padding, no runaway range
    for trace in fig.data:
        assert _inside(fig, "yaxis", trace.y, False), trace.name
        assert _inside(fig, "xaxis", trace.x, False), trace.name
    names = [t.name for t in fig.data]
    # legends name the method with the series (a report reader sees "slicing, constant", not "constant")
    assert {"slicing, constant", "slicing, dynamic SB=0.1", "Pareto frontier"} <= set(names) and "dense (20)" in names
    front = fig.data[names.index("Pareto frontier")]
    assert sorted(zip(front.x, front.y)) == [(0.8, 40.0), (0.9, 30.0), (1.0, 20.0)]  # dense ends the frontier
    assert "test data" in fig.layout.title.text


def test_runs_bigger_and_worse_than_dense_are_on_no_frontier_and_linear_axes_start_at_zero(store):
    frame = _frame(store, [("dense", None, 1.0, 36.0), ("slicing", "constant", 1.11, 5300.0),
                           ("slicing", "dynamic SB=0.1", 1.12, 5650.0), ("quantization", "lim 4/2", 0.4, 9000.0)])
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "t", log_y=False)
    names = [t.name for t in fig.data]
    front = fig.data[names.index("Pareto frontier")]
    assert sorted(zip(front.x, front.y)) == [(0.4, 9000.0), (1.0, 36.0)]  # the sliced runs: bigger and worse
    assert fig.layout.yaxis.range[0] == 0.0  # padding alone would reach about -700


def test_log_axis_keeps_every_trace_and_annotation_inside(store):
    frame = _frame(store, [("dense", None, 1.0, 25.0), ("quantization", "lim 4/2-bit rtn", 0.5, 2000.0),
                           ("quantization", "lim 4/2-bit rtn", 0.4, 20000.0)])
    fig = tradeoff_figure(frame, "config.low_fraction", "metrics.ppl", "test data")
    assert fig.layout.yaxis.type == "log"
    low, high = _axis_range(fig, "yaxis")
    assert low < math.log10(25 * 0.95) and high > math.log10(21000) and high < 6  # in decades, not 10^24
    for trace in fig.data:
        assert _inside(fig, "yaxis", trace.y, True), trace.name
    for note in fig.layout.annotations:
        if note.yref == "y":
            assert low <= note.y <= high


def test_single_point_gets_a_sane_range(store):
    frame = _frame(store, [("dense", None, 1.0, 20.0), ("slicing", "constant", 0.9, 30.0)])
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "t")
    low, high = _axis_range(fig, "xaxis")
    assert 0.8 < low < 0.9 and 1.0 < high < 1.1


def test_previews_are_hollow_and_dashed(store):
    _frame(store, BASIC)
    frame = _frame(store, [("slicing", "constant", 0.85, 36.0)], preview=True)
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "t")
    preview = next(t for t in fig.data if t.name == "slicing, constant (preview)")
    assert preview.line.dash == "dash" and preview.marker.color == "white"
    front = next(t for t in fig.data if t.name == "Pareto frontier")
    assert 36.0 not in front.y  # previews never define the frontier


def test_colours_are_explicit_distinct_and_stable(store):
    fig = tradeoff_figure(_frame(store, BASIC), "metrics.size_fraction", "metrics.ppl", "t")
    colours = {t.name.removeprefix("slicing, "): t.line.color for t in fig.data
               if t.name in ("slicing, constant", "slicing, dynamic SB=0.1")}
    assert all(c and c.startswith("#") for c in colours.values())
    assert len(set(colours.values())) == 2
    assert colours["constant"] == series_colour("constant")
    many = series_colours([f"series {i}" for i in range(12)])
    assert len(set(many.values())) == 12


@pytest.mark.parametrize("x", ["metrics.size_fraction", "config.low_fraction"])
def test_every_point_has_an_error_bar(store, x):
    fig = tradeoff_figure(_frame(store, BASIC), x, "metrics.ppl", "t")
    constant = next(t for t in fig.data if t.name == "slicing, constant")
    assert list(constant.error_y.array) == pytest.approx([v * 0.05 for v in constant.y])


def test_log_axis_ticks_are_clean_1_2_5_values_inside_the_range(store):
    frame = _frame(store, [("dense", None, 1.0, 18.7), ("slicing", "constant", 1.1, 74.0),
                           ("slicing", "constant", 1.2, 220.0)])
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "t")
    low, high = fig.layout.yaxis.range
    values = list(fig.layout.yaxis.tickvals)
    assert values == [20, 50, 100, 200] and list(fig.layout.yaxis.ticktext) == ["20", "50", "100", "200"]
    assert all(low <= math.log10(v) <= high for v in values)


@pytest.mark.parametrize("low, high", [(23.75, 120.0), (34.37, 344.0), (23.75, 30.0), (23.5, 24.1),
                                       (0.0007, 0.0009), (4.5, 500.0), (0.13, 2.5), (13.0, 120.0), (23.75, 157.0)])
def test_log_axis_labels_a_tick_near_every_value_even_in_a_narrow_range(low, high):
    """Gemma-3's dense perplexity (23.75) on an axis up to 120 had only 50 and 100 labelled, SmolLM2's (34.37)
    under a 2-bit run's 344 only 50 and up: a log range now gets denser round ticks where 1-2-5 leaves its ends
    bare (at least two inside the range, one within 30% of its lowest value)."""
    axis = padded_range([low, high], log=True)
    values, labels = log_ticks(axis)
    assert len(values) >= 2 and len(labels) == len(values)
    assert all(axis[0] <= math.log10(v) <= axis[1] for v in values)
    assert min(abs(math.log10(v / low)) for v in values) <= math.log10(1.3)
    assert values == sorted(values) and len(set(labels)) == len(labels)
    assert len(values) <= 10  # a bare bottom gets one more tick, not every mantissa


def test_runs_with_the_same_numbers_stay_visible_and_name_each_other(store):
    """Two rankings that drop the same layers give the same model: both points are drawn with different markers,
    and each hover names the other run."""
    frame = _frame(store, [("dense", None, 1.0, 20.0), ("dropping", "drop by LR", 0.8, 31.0),
                           ("dropping", "drop by sensitivity", 0.8, 31.0), ("dropping", "drop by LR", 0.6, 55.0)])
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.ppl", "test data")
    by_name = {t.name: t for t in fig.data}
    lr, measured = by_name["drop by LR"], by_name["drop by sensitivity"]
    assert lr.marker.symbol != measured.marker.symbol
    ids = {int(i) for i in frame["id"]}
    lr_run, measured_run = (int(frame[(frame["series"] == s) & (frame["metrics.ppl"] == 31.0)]["id"].iloc[0])
                            for s in ("drop by LR", "drop by sensitivity"))
    assert f"same point as run {measured_run} · drop by sensitivity" in lr.text[list(lr.y).index(31.0)]
    assert f"same point as run {lr_run} · drop by LR" in measured.text[0]
    assert "same point" not in lr.text[list(lr.y).index(55.0)] and len(ids) == 4


def test_kld_axis_puts_dense_at_zero_and_orders_the_frontier_by_lower_divergence(store):
    for method, series, fraction, kld in [("dense", None, 1.0, None), ("quantization", "lim", 0.5, 0.20),
                                          ("quantization", "lim", 0.4, 0.35), ("quantization", "zd", 0.5, 0.30)]:
        metrics = {"ppl": 20.0, "size_fraction": fraction}
        if kld is not None:
            metrics.update(kld_mean=kld, kld_median=kld / 2, kld_p99=kld * 5, same_top=0.8)
        store.add_run(model="m", model_fingerprint="f", method=method, config={"series": series or method},
                      data=DATA, metrics=metrics, duration_s=1.0)
    frame = store.runs_frame()
    assert quality_axes(frame)["metrics.kld_mean"].startswith("KL divergence to dense")
    fig = tradeoff_figure(frame, "metrics.size_fraction", "metrics.kld_mean", "test data")
    dense_line = next(t for t in fig.data if t.name.startswith("dense ("))
    assert list(dense_line.y) == [0.0, 0.0] and fig.layout.yaxis.range[0] == 0.0
    frontier = next(t for t in fig.data if t.name == "Pareto frontier")
    assert sorted(zip(frontier.x, frontier.y)) == [(0.4, 0.35), (0.5, 0.2), (1.0, 0.0)]  # zd (0.30 at 0.5) is beaten
    assert "KL divergence to dense" in fig.layout.title.text
