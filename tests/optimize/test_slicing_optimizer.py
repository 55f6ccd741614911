"""'Find best schedule': interpolated damage, exact measured widths, held-out text only, CLI."""

from __future__ import annotations

import itertools
import json

import pytest

import engine.runs.slicing_optimizer as slicing_optimizer
from engine.cli import main
from engine.core.data import DataSpec
from engine.optimize.slicing_budget import (
    DamageCurves,
    check_reachable,
    check_target,
    measured_widths,
    predicted_damage,
)
from engine.runs.slicing_optimizer import SlicingOptimizerPlan, optimize_slicing, slicing_optimization_if_cached
from engine.slicing.schedules import ScheduleError

CURVES = DamageCurves((0.25, 0.5), [[1.0, 3.0], [0.2, 0.5], [2.0, 9.0]])


def test_damage_curves_interpolate_from_zero_and_refuse_beyond_what_was_measured():
    assert CURVES.at(0, 0.0) == 0.0 and CURVES.at(0, 0.125) == pytest.approx(0.5)
    assert CURVES.at(2, 0.375) == pytest.approx(5.5)
    assert predicted_damage(CURVES, [0.25, 0.5, 0.0]) == pytest.approx(1.5)
    with pytest.raises(ScheduleError, match="beyond the largest fraction measured"):
        CURVES.at(1, 0.6)
    with pytest.raises(ScheduleError, match=r"0\.3889 after rounding widths to 8"):  # 576·0.6 → 352 kept
        check_reachable(0.39, [0.1, 0.4], 576, 30, 8)
    for bad in (0.0, 0.51, -0.1, "x"):
        with pytest.raises(ScheduleError, match=r"outside \(0, 0.5\]"):
            check_target(bad)


def test_measured_widths_are_the_exact_optimum_under_the_average():
    hidden, round_to, target = 16, 4, 0.25
    widths = measured_widths(CURVES, target, hidden, round_to)
    assert sum(1 - d / hidden for d in widths) / 3 >= target - 1e-12
    options = [8, 12, 16]
    feasible = [w for w in itertools.product(options, repeat=3) if sum(w) <= hidden * 3 * (1 - target)]
    best = min(feasible, key=lambda w: predicted_damage(CURVES, [1 - d / hidden for d in w]))
    assert predicted_damage(CURVES, [1 - d / hidden for d in widths]) == pytest.approx(
        predicted_damage(CURVES, [1 - d / hidden for d in best]))
    assert widths[1] == 8  # the cheap layer takes the slicing


def test_search_reads_only_calibration_text_and_returns_the_best_checked(store, tiny_loaded, monkeypatch):
    seen = []
    real = slicing_optimizer.token_windows
    monkeypatch.setattr(slicing_optimizer, "token_windows",
                        lambda spec, *a, **k: seen.append(spec) or real(spec, *a, **k))
    calibration = DataSpec("wiki-offline", "calibration", 32, 4)
    plan = SlicingOptimizerPlan(0.25, held_out_windows=2)
    result = optimize_slicing(store, tiny_loaded, plan, calibration)
    assert seen and all(spec.split == "calibration" for spec in seen)
    assert result.best.measured_ppl == min(c.measured_ppl for c in result.candidates)
    assert all(c.fraction >= 0.25 - 1e-9 for c in result.candidates)  # compared at equal size
    assert result.slicings == sum(1 for c in result.candidates if not c.reused) <= plan.sb_checks + 2
    assert any(c.basis is None for c in result.candidates) and len(result.grid) > plan.sb_checks
    low_end = min(g["SB"] for g in result.grid if g["achieved fraction"] >= 0.25 - 1e-9)
    assert any(c.basis == low_end for c in result.candidates)  # the low end of the SB range is always checked
    assert slicing_optimization_if_cached(store, tiny_loaded, plan, calibration).to_dict() == result.to_dict()


@pytest.mark.slow  # the engine path is covered in the fast tier; this adds the CLI wiring
def test_cli_optimize_slicing(tiny_folder, tmp_path, capsys):
    out = tmp_path / "s.json"
    base = ["optimize-slicing", "--model", tiny_folder, "--store", str(tmp_path / "r.sqlite"), "--held-out", "2",
            "--calib-windows", "4", "--calib-seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32"]
    assert main([*base, "--target", "0.7"]) == 2
    assert "outside (0, 0.5]" in capsys.readouterr().err
    assert main([*base, "--json", str(out)]) == 0
    assert '"kind": "slicing"' in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["slicings"] >= 1 and written["eval_ppl"] > 1
