"""Score charts: monotone outlier colours, fractions not counts, a zoomed LR profile with its outliers named."""

from __future__ import annotations

import pytest
import torch

from engine.core.architectures import architecture_for
from engine.core.data import DataSpec, TokenWindows
from engine.scores.outliers import WeightOutliers, weight_outliers
from engine.scores.redundancy import LayerRedundancy, layer_redundancy
from engine.viz import charts
from engine.viz.style import padded_range, wants_log
from tests.tiny_models import TINY_FACTORIES


def _scores(lr: list[float]) -> LayerRedundancy:
    return LayerRedundancy(lr=lr, attn_cos=[v + 0.01 for v in lr], mlp_cos=[v - 0.01 for v in lr],
                           position_cos=[[v] * 4 for v in lr], window_cos=[[v] for v in lr],
                           histogram=[[0] * 200 for _ in lr], n_tokens=100, n_windows=1, seqlen=4,
                           data_label="test")


def test_outlier_heatmap_shows_fractions_of_each_module_with_a_monotone_scale():
    model = TINY_FACTORIES["llama"]()
    outliers = weight_outliers(model, architecture_for("llama"), k=2.0)
    fig = charts.outlier_heatmap(outliers, "t")
    z = fig.data[0].z
    sizes = outliers.sizes
    for row, counts, size in zip(z, outliers.outliers, sizes):
        assert list(row) == pytest.approx([100 * c / n for c, n in zip(counts, size)])
    scale = fig.data[0].colorscale  # light (few outliers) to dark (many): luminance falls monotonically
    luminance = [_luminance(colour) for _, colour in scale]
    assert all(a >= b for a, b in zip(luminance, luminance[1:]))
    assert fig.data[0].zmin == 0


def _luminance(colour: str) -> float:
    if colour.startswith("#"):
        r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    else:
        r, g, b = (float(v) for v in colour[colour.index("(") + 1:colour.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_lr_profile_zooms_to_the_bulk_and_names_the_outlier_inside_the_axes():
    lr = [0.004, 0.83] + [0.93 + 0.002 * i for i in range(25)] + [0.76]
    fig = charts.lr_profile_chart(_scores(lr), "t")
    low, high = fig.layout.yaxis.range
    assert low > 0.5 and high < 1.05  # layer 0 no longer flattens the rest
    (note,) = [a for a in fig.layout.annotations if "layer 0" in a.text]
    assert low <= note.y <= high and "0.004" in note.text
    assert "attention 0.014" in note.text and "MLP -0.006" in note.text  # every series the axis leaves out
    assert max(len(line) for line in note.text.split("<br>")) <= 32  # short lines: fits a half-page chart
    full = charts.lr_profile_chart(_scores(lr), "t", zoom=False)
    assert full.layout.yaxis.range is None  # the unzoomed view is Plotly's full autorange


def test_zd_axis_shows_the_differences():
    zd = [0.126 + 0.001 * i for i in range(27)]  # the built-in model's spread: 0.126-0.152
    outliers = WeightOutliers(["q"], [[v] for v in zd], [[1] for _ in zd], zd, [1] * len(zd), 3.0, [[100]] * len(zd))
    fig = charts.zd_chart(outliers, "t")
    low, high = fig.layout.yaxis.range
    assert low > 0 and min(outliers.zd_layer) > low and max(outliers.zd_layer) < high
    assert high - low < 3 * (max(outliers.zd_layer) - min(outliers.zd_layer)) + 1e-3


def test_rank_scatter_says_what_rho_means():
    model = TINY_FACTORIES["llama"]()
    windows = TokenWindows(torch.randint(0, 128, (2, 16)), DataSpec(split="calibration", seqlen=16, n_windows=2))
    lr = layer_redundancy(model, architecture_for("llama"), windows)
    fig = charts.rank_scatter(lr, weight_outliers(model, architecture_for("llama")), "t")
    title = fig.layout.title.text
    assert "Spearman ρ" in title and any(w in title for w in ("agreement", "unrelated", "opposite"))
    assert charts.agreement_words(0.05) == "the two orders are unrelated"
    assert "strong" in charts.agreement_words(0.8)


def test_every_score_chart_uses_explicit_colours_and_the_white_template():
    model = TINY_FACTORIES["llama"]()
    arch = architecture_for("llama")
    windows = TokenWindows(torch.randint(0, 128, (2, 16)), DataSpec(split="calibration", seqlen=16, n_windows=2))
    lr, zd = layer_redundancy(model, arch, windows), weight_outliers(model, arch)
    figures = [charts.lr_profile_chart(lr, "t"), charts.zd_chart(zd, "t"), charts.rank_scatter(lr, zd, "t"),
               charts.token_cosine_histogram(lr, 1, "t"),
               charts.bit_map_chart(charts.bit_map_table([4, 2, 3], lr.lim, "LIM"), "t"),
               charts.schedule_chart(charts.schedule_table([0.1, 0.2, 0.3], [56, 48, 40], 64, lr.lr), "t")]
    for fig in figures:
        assert fig.layout.template.layout.paper_bgcolor in ("white", "#FFFFFF", "#ffffff", None)
        assert fig.layout.paper_bgcolor == "white"
        for trace in fig.data:
            colour = (trace.marker.color if trace.marker is not None else None) or \
                (trace.line.color if getattr(trace, "line", None) is not None else None)
            assert colour is not None, (fig.layout.title.text, trace.name)


def test_bit_map_legend_matches_the_bars():
    fig = charts.bit_map_chart(charts.bit_map_table([4, 2, 4, 3], None, "LIM"), "t")
    bars = {t.name: t.marker.color for t in fig.data}
    assert bars == {"2 bits": charts.BIT_COLOURS[2], "3 bits": charts.BIT_COLOURS[3], "4 bits": charts.BIT_COLOURS[4]}


def test_axis_helpers():
    assert wants_log([20, 25000]) and not wants_log([20, 35]) and not wants_log([0, 100])
    low, high = padded_range([20, 35])
    assert low < 20 and high > 35 and high - low < 20
    low, high = padded_range([25, 2500], log=True)
    assert low < 1.398 and high > 3.397 and high < 4
    assert padded_range([0.9]) == pytest.approx([0.9 - 0.045 - 0.0072, 0.9 + 0.045 + 0.0072])


def test_secondary_line_points_off_the_zoomed_axis_are_annotated_inside_it():
    lim = [-0.004] + [-0.95 + 0.002 * i for i in range(20)] + [-0.2]  # layer 0 and the last far above the rest
    fig = charts.bit_map_chart(charts.bit_map_table([4] * 22, lim, "LIM"), "t")
    low, high = fig.layout.yaxis2.range
    off = [a for a in fig.layout.annotations if a.yref == "y2"]
    assert sorted(a.x for a in off) == [0, 21]
    assert all(low < a.y < high for a in off) and {a.text for a in off} == {"↑ -0.004", "↑ -0.200"}
    assert not [a for a in fig.layout.annotations if a.yref == "y2" and a.x not in (0, 21)]


def test_drop_preview_bars_are_one_layer_wide_and_values_off_the_axis_are_named():
    lr = [-0.009] + [0.93 + 0.002 * i for i in range(27)] + [0.40]
    table = charts.drop_preview_table(_scores(lr), "lr", dropped=[14, 17])
    fig = charts.drop_preview_chart(table, "t")
    assert {trace.width for trace in fig.data} == {charts.BAR_WIDTH}  # not the 3-layer gap between 14 and 17
    low, high = fig.layout.yaxis.range
    notes = {a.x: a for a in fig.layout.annotations}
    assert set(notes) == {0, 28} and all(low <= a.y <= high for a in notes.values())
    assert "-0.009" in notes[0].text and "0.400" in notes[28].text


def test_bit_map_bars_keep_their_width_when_a_level_has_few_layers():
    fig = charts.bit_map_chart(charts.bit_map_table([4] * 5 + [2] + [4] * 10 + [2], None, "LIM"), "t")
    assert {trace.width for trace in fig.data if trace.type == "bar"} == {charts.BAR_WIDTH}


def test_per_linear_bit_map_colours_each_cell_by_its_level():
    linears = ["q", "k", "v", "o", "gate", "up", "down"]
    bits = [4, {**dict.fromkeys(linears, 3), "v": 6, "down": 2}, 8]
    table = charts.module_bit_map_table(bits, linears)
    fig = charts.module_bit_map_chart(table, "t")
    heat = fig.data[0]
    assert list(heat.y) == linears and list(heat.x) == [0, 1, 2]
    assert [row[1] for row in heat.z] == [3, 3, 6, 3, 3, 3, 2] and {row[0] for row in heat.z} == {4}
    low, high = heat.zmin, heat.zmax
    scale = [(float(position), colour) for position, colour in heat.colorscale]

    def colour_of(level: int) -> set[str]:
        at = (level - low) / (high - low)  # the level's place on the scale: inside one constant band
        return {c for (p0, c0), (p1, c1) in zip(scale, scale[1:]) if p0 <= at <= p1 for c in (c0, c1)}

    for level in (2, 3, 4, 6, 8):
        assert colour_of(level) == {charts.BIT_COLOURS[level]}
    assert fig.layout.xaxis.range[0] < 0 < 2 < fig.layout.xaxis.range[1]
    assert "t" in fig.layout.title.text
    # the colour bar spans the levels used (3–5 here), each still in its own colour
    narrow = charts.module_bit_map_chart(charts.module_bit_map_table([3, {**dict.fromkeys(linears, 4), "v": 5}],
                                                                     linears), "t").data[0]
    assert list(narrow.colorbar.tickvals) == [3, 4, 5] and (narrow.zmin, narrow.zmax) == (2.5, 5.5)
    assert [c for _, c in narrow.colorscale][::2] == [charts.BIT_COLOURS[b] for b in (3, 4, 5)]
    # a linear missing from every layer is a gap, not an error; a single level still gets its colour
    gap = charts.module_bit_map_chart(charts.module_bit_map_table([dict.fromkeys(linears, 4)] * 2,
                                                                  linears + ["extra"]), "t").data[0]
    assert list(gap.colorbar.tickvals) == [4] and all(v is None or v != v for v in gap.z[-1])
