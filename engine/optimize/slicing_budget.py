"""Slicing schedules from measured per-layer damage: predicted cost of any schedule, the best SB, the best widths.

Input: for each layer, the KL (nats/token) of slicing *that layer alone* by
each measured fraction (the sensitivity lab's ``slice:f`` actions).  A layer's
damage curve is 0 at fraction 0 and interpolated linearly between the
measured fractions (flat-extrapolated beyond the last one is refused: a
schedule may not slice a layer more than the largest fraction measured).

- :func:`predicted_damage`: the sum of the layers' curves at a schedule's
  fractions (additive: an assumption the optimizers check on held-out text).
- :func:`basis_grid`: LR-dynamic schedules over a fine grid of SB values with
  their predicted damage (no slicing needed).
- :func:`measured_widths`: per-layer kept widths (multiples of ``round_to``)
  minimising the predicted damage with the average removed fraction at least
  ``target`` — the exact knapsack of :mod:`engine.optimize.knapsack`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.optimize.knapsack import solve
from engine.slicing.schedules import ScheduleError, SlicingSchedule, schedule_dims, schedule_dynamic

MAX_TARGET = 0.5


def check_target(target: float) -> float:
    """A slicing target SP in (0, 0.5]; anything else is refused with the range."""
    if not isinstance(target, (int, float)) or not 0.0 < float(target) <= MAX_TARGET:
        raise ScheduleError(f"The slicing target {target!r} is outside (0, {MAX_TARGET}]: choose the average share "
                            f"of residual dimensions to remove, e.g. 0.25.")
    return float(target)


@dataclass(frozen=True)
class DamageCurves:
    """``kl[i][j]``: KL of slicing layer ``i`` alone by ``fractions[j]`` (ascending, all > 0)."""

    fractions: tuple[float, ...]
    kl: list[list[float]]

    def __post_init__(self) -> None:
        if not self.fractions or list(self.fractions) != sorted(self.fractions) or self.fractions[0] <= 0:
            raise ValueError("Measured fractions must be ascending and above 0 (e.g. 0.1, 0.2, 0.3, 0.4).")
        # KL is never negative; a measured -1e-6 is float noise of a layer that lost nothing
        object.__setattr__(self, "kl", [[max(0.0, float(v)) for v in row] for row in self.kl])

    def at(self, layer: int, fraction: float) -> float:
        """Interpolated KL of slicing ``layer`` by ``fraction`` (0 at 0; beyond the last measured: refused)."""
        if fraction > self.fractions[-1] + 1e-9:
            raise ScheduleError(f"Layer {layer} would be sliced by {fraction:.3f}, beyond the largest fraction "
                                f"measured ({self.fractions[-1]:g}): measure larger fractions or lower the target.")
        return float(np.interp(fraction, (0.0, *self.fractions), (0.0, *self.kl[layer])))


def predicted_damage(curves: DamageCurves, fractions: Sequence[float]) -> float:
    """Sum over layers of the interpolated KL at each layer's fraction."""
    return sum(curves.at(i, f) for i, f in enumerate(fractions))


def achieved(dims: Sequence[int], hidden: int) -> list[float]:
    """Per-layer removed fractions of rounded widths."""
    return [1.0 - d / hidden for d in dims]


def basis_grid(curves: DamageCurves, lr: Sequence[float], target: float, hidden: int, round_to: int,
               steps: int = 50) -> list[tuple[float, SlicingSchedule, list[int], float]]:
    """``(SB, schedule, dims, predicted KL)`` for SB on a grid of ``steps + 1`` values over [0, SP].

    SB values whose schedule is impossible (a layer at 100%) or slices beyond the measured curves are left out.
    """
    out = []
    for sb in np.linspace(0.0, target, steps + 1):
        try:
            schedule = schedule_dynamic(lr, target, float(sb))
            dims = schedule_dims(schedule, hidden, round_to)
            damage = predicted_damage(curves, achieved(dims, hidden))
        except ScheduleError:
            continue
        out.append((round(float(sb), 6), schedule, dims, damage))
    return out


def check_reachable(target: float, fractions: Sequence[float], hidden: int, n_layers: int, round_to: int) -> None:
    """Refuse a target the measured fractions cannot reach once widths are rounded to ``round_to``, naming the
    highest reachable one (checked before any measurement runs)."""
    check_target(target)
    if not fractions:
        raise ScheduleError("Choose at least one fraction to measure (e.g. 0.1, 0.2, 0.3, 0.4).")
    smallest = int(np.ceil(hidden * (1 - max(fractions)) / round_to) * round_to)
    highest = 1.0 - smallest / hidden
    if target > highest + 1e-12:
        raise ScheduleError(f"A target of {target:g} needs layers sliced beyond the largest fraction measured "
                            f"({max(fractions):g}; {highest:.4f} after rounding widths to {round_to}): lower the "
                            "target or measure larger fractions.")


def measured_widths(curves: DamageCurves, target: float, hidden: int, round_to: int) -> list[int]:
    """Kept width per layer (multiples of ``round_to``, at least ``hidden·(1 − max measured fraction)``) with the
    least predicted damage whose average removed fraction is at least ``target``."""
    n_layers = len(curves.kl)
    check_reachable(target, curves.fractions, hidden, n_layers, round_to)
    smallest = int(np.ceil(hidden * (1 - curves.fractions[-1]) / round_to) * round_to)
    options = sorted({hidden, *range(smallest, hidden, round_to)})
    costs = [options] * n_layers  # kept dims: the budget caps their total
    values = [[curves.at(i, 1.0 - d / hidden) for d in options] for i in range(n_layers)]
    budget = int(np.floor(hidden * n_layers * (1.0 - target)))
    best = solve(costs, values, budget).best
    return [options[j] for j in best.choice]
