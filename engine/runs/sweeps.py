"""Sweeps: grids of plans, run one after another, every point's error kept instead of stopping the sweep.

The one place sweeps are generated, for pages and CLI alike: a slicing sweep
is constant slicing at each target plus dynamic slicing at each (target,
basis) with basis <= target; a quantization sweep is every (low bits,
ordering, low-bit fraction).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from engine.core.progress import StageProgress
from engine.runs.plans import QuantPlan, SlicingPlan
from engine.runs.runner import RunOutcome


def grid(*axes: Sequence) -> list[tuple]:
    """Cartesian product of the axes, in order (first axis slowest)."""
    points: list[tuple] = [()]
    for axis in axes:
        points = [p + (v,) for p in points for v in axis]
    return points


def slicing_sweep(base: SlicingPlan, targets: Sequence[float], bases: Sequence[float],
                  schedules: Sequence[str] = ("constant", "dynamic")) -> list[SlicingPlan]:
    """Constant slicing at each target; dynamic at each (target, basis) with basis <= target."""
    unknown = set(schedules) - {"constant", "dynamic"}
    if unknown:
        raise ValueError(f"A slicing sweep takes 'constant' and/or 'dynamic' schedules, not {sorted(unknown)}.")
    plans = []
    if "constant" in schedules:
        plans += [replace(base, schedule="constant", target=t, basis=t, fractions=()) for t in targets]
    if "dynamic" in schedules:
        plans += [replace(base, schedule="dynamic", target=t, basis=b, fractions=())
                  for t, b in grid(targets, bases) if b <= t]
    return plans


def quantization_sweep(base: QuantPlan, low_bits: Sequence[int], orderings: Sequence[str],
                       low_fractions: Sequence[float]) -> list[QuantPlan]:
    """Every (low bits, ordering, fraction of layers at the low level) of the paper's ordering chart."""
    unknown = set(orderings) - {"lim", "zd", "random", "reversed-lim"}
    if unknown:
        raise ValueError(f"A quantization sweep takes orderings lim, zd, random, reversed-lim; not {sorted(unknown)}.")
    return [replace(base, low_bits=b, ordering=o, low_fraction=f, target_bits=None, custom_order=())
            for b, o, f in grid(low_bits, orderings, low_fractions)]


@dataclass
class SweepResult:
    """Stored outcomes and, per failed point, its plan and the message."""

    outcomes: list[RunOutcome] = field(default_factory=list)
    errors: list[tuple[object, str]] = field(default_factory=list)


def run_sweep(plans: Sequence, run_one: Callable[[object], RunOutcome],
              progress: StageProgress | None = None) -> SweepResult:
    """Run ``run_one(plan)`` for every plan; a point that fails with a ValueError is recorded and skipped."""
    result = SweepResult()
    for done, plan in enumerate(plans, start=1):
        try:
            result.outcomes.append(run_one(plan))
        except ValueError as err:  # every engine input error is a ValueError
            result.errors.append((plan, str(err)))
        if progress is not None:
            progress("runs", done, len(plans))
    return result
