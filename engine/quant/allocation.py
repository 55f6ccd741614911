"""Bit allocation across decoder layers (docs/methods.md §4, steps 1-2).

Everything here works on plain per-layer importance vectors (``list[float]``,
higher = more important: pass LIM as is and ZD negated), so it does not
depend on how scores are computed.

1. :func:`layer_order` lists layer indices from the *least* important to the
   most important: the queue in which layers move to lower bit levels.
   Kinds: ``importance`` (ascending importance, ties by index), ``reversed``
   (the opposite: most important layers go low first, a sanity baseline),
   ``random`` (seeded, reproducible), ``custom`` (a permutation you give,
   least important first).
2. An allocation hands the first layers of that queue the lowest level:
   - :func:`allocate_fraction`: two levels and the fraction of layers at the
     low one (``round(fraction · L)`` layers, halves rounded up);
   - :func:`allocate_average`: a target average of bits per layer.  With two
     levels ``b_lo < b_hi``, ``n_hi = (target - b_lo) / (b_hi - b_lo) · L``
     (3.25 bits from 4/2 puts 62.5% of layers at 4 bits); by default
     ``n_hi`` is rounded down, so the achieved average never exceeds the
     target (a size budget), or to the nearest layer count.  *Generalisation to
     more levels*: only the two levels that bracket the target are used;
   - :func:`allocate_fractions`: any number of levels, each with the fraction
     of layers it gets; the lowest level takes the least important layers,
     the next level the next ones, and so on (counts by largest remainder).

Averages are per layer (the METHODS formula); the honest bits per weight,
including scales and zeros, come from ``engine.quantize.size_report``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from engine.quant.grid import MAX_BITS, MIN_BITS, QuantizationError
from engine.quant.layer_bits import LayerBits, all_levels, is_per_module, levels_of, mean_level

ORDERINGS = ("importance", "reversed", "random", "custom")
ROUNDINGS = ("down", "nearest")


class AllocationError(QuantizationError):
    """An allocation request is inconsistent or unreachable; the message says what to do."""


@dataclass(frozen=True)
class Allocation:
    """Bits of every layer (``bits[i]`` for layer i) and how they were chosen.

    An entry is one level for the whole layer, or a level per linear (the budget optimizer's module
    granularity: :mod:`engine.quant.layer_bits`); the orderings here only make per-layer entries.
    ``order``: layer indices least important first.  ``target_bits``: the
    requested average, if any (compare with :attr:`average_bits`).
    """

    bits: tuple[LayerBits, ...]
    order: tuple[int, ...]
    target_bits: float | None = None
    note: str = field(default="", compare=False)

    @property
    def n_layers(self) -> int:
        return len(self.bits)

    @property
    def levels(self) -> tuple[int, ...]:
        return tuple(all_levels(self.bits))

    @property
    def per_module(self) -> bool:
        """True when some layer's linears have different levels."""
        return is_per_module(self.bits)

    @property
    def counts(self) -> dict[int, int]:
        """Layers at each level (layers with a level per linear are not counted)."""
        return {level: sum(b == level for b in self.bits if isinstance(b, int)) for level in self.levels}

    @property
    def fractions(self) -> dict[int, float]:
        return {level: count / self.n_layers for level, count in self.counts.items()}

    @property
    def average_bits(self) -> float:
        """Mean code bits per layer (scales and zeros not included).  A layer with a level per linear counts
        with its linears' mean level, unweighted: for bits per *weight* use ``engine.quant.size.size_report``."""
        return sum(mean_level(b) for b in self.bits) / self.n_layers

    def low_fraction(self, low_bits: int) -> float:
        """Fraction of layers at ``low_bits`` or fewer (the x axis of the paper's ordering chart)."""
        return sum(max(levels_of(b)) <= low_bits for b in self.bits) / self.n_layers

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "order": list(self.order), "target_bits": self.target_bits,
                "average_bits": self.average_bits,
                "fractions": {**{str(k): v for k, v in self.fractions.items()},
                              **({"level per linear": sum(not isinstance(b, int) for b in self.bits) / self.n_layers}
                                 if self.per_module else {})},
                "note": self.note}


def layer_order(
    n_layers: int,
    kind: str = "importance",
    importance: Sequence[float] | None = None,
    seed: int = 0,
    permutation: Sequence[int] | None = None,
) -> list[int]:
    """Layer indices from least to most important (first in line for low bits)."""
    if n_layers < 1:
        raise AllocationError("A model needs at least one layer to allocate bits.")
    if kind not in ORDERINGS:
        raise AllocationError(f"Unknown ordering '{kind}'. Choose one of: {', '.join(ORDERINGS)}.")
    if kind in ("importance", "reversed"):
        if importance is None or len(importance) != n_layers:
            got = "none" if importance is None else f"{len(importance)} values"
            raise AllocationError(f"Ordering by importance needs one score per layer ({n_layers}); got {got}.")
        if any(not math.isfinite(float(v)) for v in importance):
            raise AllocationError("Importance scores contain NaN or infinity; recompute the scores.")
        ascending = sorted(range(n_layers), key=lambda i: (float(importance[i]), i))
        return ascending if kind == "importance" else ascending[::-1]
    if kind == "random":
        order = list(range(n_layers))
        random.Random(seed).shuffle(order)
        return order
    return check_permutation(permutation, n_layers)


def check_permutation(permutation: Sequence[int] | None, n_layers: int) -> list[int]:
    """A custom order must name every layer 0..L-1 exactly once."""
    if permutation is None or sorted(int(i) for i in permutation) != list(range(n_layers)):
        raise AllocationError(
            f"A custom order must list every layer index 0..{n_layers - 1} exactly once "
            "(least important first)."
        )
    return [int(i) for i in permutation]


def _check_levels(levels: Sequence[int]) -> list[int]:
    unique = sorted(set(int(b) for b in levels))
    if not unique:
        raise AllocationError("Give at least one bit level.")
    bad = [b for b in unique if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise AllocationError(f"Bit levels {bad} are out of range: choose levels from {MIN_BITS} to {MAX_BITS}.")
    return unique


def _from_counts(order: Sequence[int], counts: Mapping[int, int], target: float | None, note: str) -> Allocation:
    bits = [0] * len(order)
    position = 0
    for level in sorted(counts):
        for layer in order[position : position + counts[level]]:
            bits[layer] = level
        position += counts[level]
    return Allocation(bits=tuple(bits), order=tuple(order), target_bits=target, note=note)


def allocate_fractions(order: Sequence[int], fractions: Mapping[int, float]) -> Allocation:
    """Any number of levels: ``{bits: fraction of layers}`` (fractions sum to 1).

    Counts use the largest-remainder rule (ties favour lower levels), so they
    always add up to the number of layers.
    """
    order = check_permutation(order, len(order))
    levels = _check_levels(list(fractions))
    values = {int(b): float(f) for b, f in fractions.items()}
    if any(not 0.0 <= f <= 1.0 for f in values.values()):
        raise AllocationError("Every level's fraction of layers must be between 0 and 1.")
    if abs(sum(values.values()) - 1.0) > 1e-6:
        raise AllocationError("Fractions of layers per level must add up to 1; "
                              f"they add up to {sum(values.values()):.4g}.")
    n = len(order)
    exact = {b: round(values[b] * n, 9) for b in levels}
    counts = {b: math.floor(exact[b]) for b in levels}
    spare = n - sum(counts.values())
    for b in sorted(levels, key=lambda b: (-(exact[b] - counts[b]), b))[:spare]:
        counts[b] += 1
    return _from_counts(order, counts, None, "fractions per level")


def allocate_fraction(order: Sequence[int], high_bits: int, low_bits: int, low_fraction: float) -> Allocation:
    """Two levels: ``round(low_fraction · L)`` least important layers at ``low_bits``, the rest high."""
    if not 0.0 <= float(low_fraction) <= 1.0:
        raise AllocationError(f"The fraction of layers at the low level must be in [0, 1]; got {low_fraction}.")
    high, low = int(high_bits), int(low_bits)
    _check_levels([high, low])
    if low > high:
        raise AllocationError(f"The low level ({low} bits) must not exceed the high level ({high} bits).")
    order = check_permutation(order, len(order))
    n_low = math.floor(round(float(low_fraction) * len(order), 9) + 0.5)
    if low == high:
        return _from_counts(order, {high: len(order)}, None, "one level")
    return _from_counts(order, {low: n_low, high: len(order) - n_low}, None,
                        f"{n_low} of {len(order)} layers at {low} bits")


def allocate_average(order: Sequence[int], levels: Sequence[int], target_bits: float,
                     rounding: str = "down") -> Allocation:
    """Layers split between the two levels bracketing ``target_bits`` (average bits per layer).

    ``rounding='down'`` never exceeds the target; ``'nearest'`` gets closest.
    An unreachable target (outside the levels) is refused.
    """
    if rounding not in ROUNDINGS:
        raise AllocationError(f"Unknown rounding '{rounding}'. Choose 'down' or 'nearest'.")
    unique = _check_levels(levels)
    order = check_permutation(order, len(order))
    target = float(target_bits)
    if not math.isfinite(target) or target < unique[0] - 1e-9 or target > unique[-1] + 1e-9:
        raise AllocationError(
            f"A target of {target_bits} bits is unreachable with levels {unique}: "
            f"choose a target between {unique[0]} and {unique[-1]}, or add a level."
        )
    n = len(order)
    exact_level = [b for b in unique if abs(b - target) <= 1e-9]
    if exact_level:
        return _from_counts(order, {exact_level[0]: n}, target, "target is one level")
    low = max(b for b in unique if b < target)
    high = min(b for b in unique if b > target)
    exact = round((target - low) / (high - low) * n, 9)
    n_high = math.floor(exact) if rounding == "down" else math.floor(exact + 0.5)
    return _from_counts(order, {low: n - n_high, high: n_high}, target,
                        f"{n_high} of {n} layers at {high} bits, {n - n_high} at {low} bits")


def uniform_allocation(n_layers: int, bits: int) -> Allocation:
    """Every layer at ``bits``."""
    _check_levels([bits])
    return Allocation(bits=(int(bits),) * n_layers, order=tuple(range(n_layers)), note="uniform")
