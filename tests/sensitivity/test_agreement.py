"""Agreement statistics on known vectors, the bootstrap interval, top-k overlap and the written finding."""

from __future__ import annotations

import random

import pytest

from engine.scores.outliers import WeightOutliers
from engine.scores.ranking import spearman
from engine.scores.redundancy import LayerRedundancy
from engine.sensitivity.actions import parse_action
from engine.sensitivity.agreement import (
    Agreement,
    LayerScore,
    agreement_table,
    bootstrap_damage,
    check_sample,
    layer_scores,
    top_k_overlap,
)
from engine.sensitivity.errors import SampleTooSmallError
from engine.sensitivity.findings import score_names, sensitivity_finding
from engine.sensitivity.scan import ActionDamage


def damage(text: str, window_kl: list[list[float]]) -> ActionDamage:
    """A measured damage with the given per-window KL ``[L][n]`` (every window weighs the same)."""
    kl = [sum(row) / len(row) for row in window_kl]
    return ActionDamage(parse_action(text).to_dict(), kl, kl, window_kl, window_kl, 3.0, len(window_kl[0]), 17,
                        16 * len(window_kl[0]), "test windows", 0.0, 1.0)


def noisy(means: list[float], n: int = 8, spread: float = 0.0, seed: int = 0) -> list[list[float]]:
    """``n`` windows per layer: ``means`` plus seeded Gaussian noise of standard deviation ``spread``."""
    rng = random.Random(seed)
    return [[m + rng.gauss(0, spread) for _ in range(n)] for m in means]


def test_spearman_on_known_vectors():
    assert spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4, 5], [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 − 6·4 / (5·24)


def test_agreement_rho_interval_and_overlap_on_known_damage():
    measured = damage("quant:3", noisy([0.1, 0.2, 0.3, 0.4, 0.5], spread=0.01))
    scores = [LayerScore("perfect", (1, 2, 3, 4, 5), (1, 2, 3, 4, 5), "high = costly"),
              LayerScore("reversed", (5, 4, 3, 2, 1), (5, 4, 3, 2, 1), "high = costly"),
              LayerScore("known", (2, 1, 4, 3, 5), (2, 1, 4, 3, 5), "high = costly")]
    rows = {r.score: r for r in agreement_table(scores, [measured], top_k=2, resamples=200)}
    assert (rows["perfect"].rho, rows["perfect"].low, rows["perfect"].high) == pytest.approx((1, 1, 1))
    assert rows["reversed"].rho == pytest.approx(-1) and rows["reversed"].verdict == "backwards"
    assert rows["known"].rho == pytest.approx(0.8) and rows["known"].low <= 0.8 <= rows["known"].high
    assert rows["perfect"].overlap == 1.0 and rows["reversed"].overlap == 0.0 and rows["known"].overlap == 0.5
    assert rows["perfect"].verdict == "well"


def test_a_weak_negative_rho_is_no_ranking_not_a_backwards_one():
    def row(rho, low, high):
        return Agreement("ZD", "drop", "drop layer", rho, low, high, top_k=2, overlap=0.0)

    assert row(-0.14, -0.20, -0.04).verdict == "not"  # the interval excludes 0, but the score is of no use
    assert row(-0.45, -0.60, -0.30).verdict == "backwards"
    assert row(0.14, 0.04, 0.20).verdict == "partly" and row(0.7, 0.6, 0.8).verdict == "well"


def test_a_noisy_measurement_gets_a_wide_interval_that_contains_rho():
    measured = damage("drop", noisy([0.10, 0.11, 0.12, 0.13, 0.14], n=8, spread=0.2))
    score = LayerScore("s", (1, 2, 3, 4, 5), (1, 2, 3, 4, 5), "high = costly")
    row = agreement_table([score], [measured], resamples=300)[0]
    assert row.low < row.rho <= row.high and row.high - row.low > 0.5


def test_bootstrap_resamples_whole_windows():
    samples = bootstrap_damage([[1.0, 3.0], [2.0, 2.0]], resamples=50, seed=0)
    assert samples.shape == (50, 2)
    assert set(samples[:, 0].tolist()) <= {1.0, 2.0, 3.0} and set(samples[:, 1].tolist()) == {2.0}


def test_top_k_overlap():
    assert top_k_overlap([5, 4, 3, 2, 1], [9, 8, 0, 0, 7], 2) == 1.0
    assert top_k_overlap([5, 4, 3, 2, 1], [0, 8, 9, 0, 7], 2) == 0.5


def test_too_few_windows_are_refused():
    with pytest.raises(SampleTooSmallError, match="at least 4"):
        check_sample(3)
    with pytest.raises(SampleTooSmallError):
        agreement_table([LayerScore("s", (1, 2), (1, 2), "")], [damage("drop", [[1, 2, 3], [2, 3, 4]])])


def _lr(values: list[float]) -> LayerRedundancy:
    n = len(values)
    return LayerRedundancy(values, [v + 0.01 for v in values], values[::-1], [[0.0]] * n, [[0.0]] * n, [[0]] * n,
                           10, 4, 8, "test")


def test_lim_and_bi_share_lr_and_the_finding_is_written_from_the_numbers():
    lr = _lr([0.2, 0.9, 0.5, 0.7, 0.4])  # low LR = costly: cost order 0, 4, 2, 3, 1
    zd = WeightOutliers(["q"], [[0.1]] * 5, [[1]] * 5, [0.30, 0.31, 0.32, 0.33, 0.34], [5, 1, 3, 2, 4], 3.0)
    slicing = damage("slice:0.25", noisy([0.5, 0.1, 0.3, 0.2, 0.4], spread=0.005))
    quant = damage("quant:3", noisy([0.3, 0.3, 0.31, 0.29, 0.3], spread=0.05))
    rows = agreement_table(layer_scores(lr, zd), [slicing, quant], resamples=300)
    by = {(r.score, r.action): r for r in rows}
    for name in ("LIM", "BI"):
        assert by[name, "slice0.25"].rho == by["LR", "slice0.25"].rho == pytest.approx(1.0)
        assert by[name, "slice0.25"].same_as == "LR"
    assert score_names(rows)["LR"] == "LR = LIM = BI"
    finding = sensitivity_finding(rows, [slicing.spec, quant.spec])
    assert finding.startswith("LR ranks 25% slicing cost (ρ = 1.00 [1.00, 1.00]) well here")
    assert "3-bit RTN cost" in finding and finding.endswith(".")
    assert "ZD" in finding  # the paper score that fails is named with its numbers
    dropping = damage("drop", slicing.window_kl)
    both = agreement_table(layer_scores(lr, zd), [slicing, dropping], resamples=100)
    together = sensitivity_finding(both, [slicing.spec, dropping.spec])
    assert together.startswith("LR ranks 25% slicing (ρ = 1.00 [1.00, 1.00]) and layer-drop cost (ρ = 1.00")
