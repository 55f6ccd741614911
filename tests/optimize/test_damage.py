"""The solver's damage: noise-aware ΔNLL and its blend with KL, monotone in bits."""

from __future__ import annotations

import math

import pytest

from engine.optimize.damage import blended, monotone_in_bits, standard_error, upper_dnll


def test_monotone_in_bits_never_negative_and_never_less_at_fewer_bits():
    # levels ascending: a lucky low reading at 3 bits is raised to the 4-bit value; negatives become 0
    assert monotone_in_bits([0.5, 0.01, 0.02, -0.003]) == [0.5, 0.02, 0.02, 0.0]
    assert monotone_in_bits([0.3, 0.2, 0.1]) == [0.3, 0.2, 0.1]  # already monotone: unchanged
    # a diverged measurement (NaN) is never free: infinite at that level and every level below it
    assert monotone_in_bits([0.5, float("nan"), 0.01]) == [math.inf, math.inf, 0.01]


def test_upper_dnll_adds_one_standard_error_of_the_windows():
    windows = [[0.1, 0.3, 0.2, 0.0], [0.01, 0.01, 0.01, 0.01]]
    se = math.sqrt(sum((x - 0.15) ** 2 for x in windows[0]) / 3) / 2
    assert standard_error(windows[0]) == pytest.approx(se)
    assert standard_error([0.4]) == 0.0
    assert upper_dnll([0.15, 0.01], windows) == pytest.approx([0.15 + se, 0.01])


def test_a_unit_whose_dnll_reads_zero_by_chance_is_not_free():
    # ΔNLL of 0 at 2 bits with noisy windows, KL clearly positive: the blend charges both
    kl, dnll, windows = [0.04, 0.004], [0.0, 0.001], [[0.02, -0.02, 0.01, -0.01], [0.001] * 4]
    damage = blended(kl, dnll, windows)
    assert damage[0] > kl[0] / 2 > damage[1] > 0
    assert damage == monotone_in_bits(damage)


def test_the_blend_averages_before_it_makes_the_levels_monotone():
    # ΔNLL + SE reads higher at 4 bits than at 3 (noise): the blend averages first, then raises 3 bits to 4's
    kl, dnll, windows = [0.05, 0.006, 0.002], [0.03, 0.0, 0.01], [[0.03] * 2, [0.0] * 2, [0.01] * 2]
    assert blended(kl, dnll, windows) == pytest.approx([0.04, 0.006, 0.006])
