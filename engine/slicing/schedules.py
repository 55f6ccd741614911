"""Slicing schedules (docs/methods.md §2): constant, LR-dynamic or custom per-layer fractions, and rounding.

Fractions are unitless in [0, 1) (0.25 = drop 25% of the residual
dimensions); dims are counts of residual dimensions.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

DEFAULT_ROUND_TO = 8


class ScheduleError(ValueError):
    """A slicing schedule is impossible; the message says what is wrong and what to do."""


# ---------------------------------------------------------------- schedules


@dataclass(frozen=True)
class SlicingSchedule:
    """Per-layer slicing fractions ``FS_i`` (before rounding), one per decoder layer.

    ``kind`` is ``constant``, ``dynamic`` or ``custom``; ``target`` is the
    nominal mean fraction SP; ``basis`` is SB (dynamic only); ``lr_scores``
    the LR vector the dynamic schedule was built from.
    """

    kind: str
    fractions: tuple[float, ...]
    target: float
    basis: float | None = None
    lr_scores: tuple[float, ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.fractions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SlicingSchedule:
        lr = data.get("lr_scores")
        return cls(data["kind"], tuple(data["fractions"]), data["target"], data.get("basis"),
                   tuple(lr) if lr is not None else None)


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ScheduleError(
            f"{name} must be a fraction in [0, 1) (e.g. 0.25 for 25%), got {value}."
        )
    return value


def schedule_constant(target: float, num_layers: int) -> SlicingSchedule:
    """Plain SliceGPT: every layer sliced by ``target`` (SP in [0, 1))."""
    target = _check_fraction("The slicing fraction SP", target)
    if num_layers < 1:
        raise ScheduleError(f"A schedule needs at least one layer, got num_layers={num_layers}.")
    return SlicingSchedule("constant", (target,) * num_layers, target)


def _min_basis(target: float, ratio: float) -> float:
    """Smallest SB keeping the most redundant layer below FS = 1 (``ratio = max(v)/mean(v)``)."""
    return (target * ratio - 1.0) / (ratio - 1.0)


def schedule_dynamic(lr_scores: Sequence[float], target: float, basis: float) -> SlicingSchedule:
    """LR-driven schedule: ``FS_i = SB + (SP − SB) · v_i / mean(v)``, ``v`` = min-max normalised LR.

    ``lr_scores`` has one LR score per layer (higher = more redundant);
    ``target`` is SP, ``basis`` is SB, with ``0 ≤ SB ≤ SP < 1``.  The mean of
    the fractions is SP and the least redundant layer gets SB exactly.
    SB = SP gives the constant schedule whatever the scores.
    """
    target = _check_fraction("The target slicing fraction SP", target)
    basis = float(basis)
    if not math.isfinite(basis) or basis < 0:
        raise ScheduleError(f"The slicing basis SB must be ≥ 0, got {basis}. Use 0 ≤ SB ≤ SP.")
    if basis > target:
        raise ScheduleError(
            f"The slicing basis SB={basis} is larger than the target SP={target}; "
            "every layer would be sliced more than the average. Use SB ≤ SP."
        )
    scores = [float(s) for s in lr_scores]
    if not scores:
        raise ScheduleError("The LR score vector is empty; compute layer scores first.")
    if not all(math.isfinite(s) for s in scores):
        raise ScheduleError(f"The LR scores contain NaN or infinite values: {scores}. Recompute the scores.")
    if basis == target:
        return SlicingSchedule("dynamic", (target,) * len(scores), target, basis, tuple(scores))
    low, high = min(scores), max(scores)
    if high == low:
        raise ScheduleError(
            f"All {len(scores)} LR scores are equal ({low}), so min-max normalisation divides by zero. "
            "Use a constant schedule, or set SB = SP."
        )
    v = [(s - low) / (high - low) for s in scores]
    ratio = 1.0 / statistics.fmean(v)
    fractions = tuple(basis + (target - basis) * vi * ratio for vi in v)
    worst = max(range(len(fractions)), key=fractions.__getitem__)
    if fractions[worst] >= 1.0:
        raise ScheduleError(
            f"SP={target}, SB={basis} would slice layer {worst} by {fractions[worst]:.3f} (≥ 100% of its "
            f"dimensions): this LR profile concentrates slicing there. Raise SB to at least "
            f"{_min_basis(target, ratio):.3f}, or lower SP."
        )
    return SlicingSchedule("dynamic", fractions, target, basis, tuple(scores))


def schedule_custom(fractions: Sequence[float]) -> SlicingSchedule:
    """A user's per-layer fractions, each in [0, 1); ``target`` is their mean."""
    values = tuple(_check_fraction(f"The slicing fraction of layer {i}", f) for i, f in enumerate(fractions))
    if not values:
        raise ScheduleError("The custom schedule is empty; give one fraction per decoder layer.")
    return SlicingSchedule("custom", values, statistics.fmean(values))


FLAT_SPREAD = 0.2  # the other layers' fractions within ±10% of SP: "nearly constant"


def flat_schedule_note(schedule: SlicingSchedule) -> str | None:
    """Why an LR-dynamic schedule is nearly constant, when it is; else ``None``.

    Min-max scaling sets the least redundant layer to SB and spreads the
    others by their distance from it.  When that layer's LR lies far below
    all the others (on the built-in model layer 0's LR is near 0, the rest
    0.8-1), the others land in a narrow band around SP and the schedule is
    constant but for one layer.  "Nearly constant": the other layers'
    fractions span less than ``FLAT_SPREAD · SP``.
    """
    if schedule.kind != "dynamic" or not schedule.lr_scores or schedule.basis is None \
            or schedule.basis >= schedule.target or len(schedule.fractions) < 3:
        return None
    scores, fractions = schedule.lr_scores, schedule.fractions
    lowest = min(range(len(scores)), key=scores.__getitem__)
    others = [f for i, f in enumerate(fractions) if i != lowest]
    if max(others) - min(others) >= FLAT_SPREAD * schedule.target:
        return None
    rest = [s for i, s in enumerate(scores) if i != lowest]
    return (f"This LR-dynamic schedule is nearly constant: layer {lowest}'s LR ({scores[lowest]:.3f}) lies far "
            f"below the others ({min(rest):.3f}–{max(rest):.3f}), so the min–max scaling gives it SB = "
            f"{schedule.basis:.0%} and squeezes the other {len(others)} layers into {min(others):.1%}–"
            f"{max(others):.1%} (the constant schedule: {schedule.target:.0%} everywhere). Expect results close "
            "to constant slicing; a custom schedule spreads the slicing by your own choice.")


def round_dim(value: float, multiple: int, hidden_size: int) -> int:
    """``value`` rounded to the nearest multiple of ``multiple`` (halves up), capped at ``hidden_size``.

    An unsliced layer (``value ≥ hidden_size``) keeps ``hidden_size`` even when
    that is not a multiple.
    """
    if value >= hidden_size:
        return hidden_size
    return min(hidden_size, math.floor(value / multiple + 0.5) * multiple)


def schedule_dims(schedule: SlicingSchedule, hidden_size: int, round_to: int = DEFAULT_ROUND_TO) -> list[int]:
    """Per-layer residual dims ``d_i = D · (1 − FS_i)`` rounded to ``round_to``: ``[L]`` ints."""
    if round_to < 1:
        raise ScheduleError(f"round_to must be a positive number of dimensions, got {round_to}.")
    dims = [round_dim(hidden_size * (1.0 - f), round_to, hidden_size) for f in schedule.fractions]
    for i, (d, f) in enumerate(zip(dims, schedule.fractions)):
        if d <= 0:
            raise ScheduleError(
                f"Layer {i} (fraction {f:.3f}) would keep {hidden_size * (1 - f):.1f} of {hidden_size} "
                f"dimensions, which rounds to 0 with round_to={round_to}. Lower SP, raise SB, or use a "
                "smaller round_to."
            )
    return dims


def achieved_fraction(dims: Sequence[int], hidden_size: int) -> float:
    """Mean slicing fraction actually applied: ``mean(1 − d_i / D)``."""
    return statistics.fmean(1.0 - d / hidden_size for d in dims)
