"""The k best ways to pick one option per unit under a total-cost budget (multiple-choice knapsack).

Pure math, no models: ``costs[u][j]`` (integers, e.g. storage bits) and
``values[u][j]`` (damage to minimise, e.g. measured KL in nats/token) of
option ``j`` of unit ``u``.  A *selection* picks one option per unit; the
solver returns the ``k`` selections of least total value whose total cost is
at most ``budget``.

Method: dynamic programming over the budget.  Costs are first reduced
without loss: subtract each unit's cheapest option and divide by the greatest
common divisor ``g`` of every remaining cost difference (the budget is rounded
down to a multiple of ``g``: no selection can use the remainder) (for bit allocations
the differences are multiples of the layers' weight counts, so ``g`` is
large and the grid small).  The table then has ``(budget − Σ min cost) / g``
cells and the result is **exact**.  When that exceeds ``max_cells``, costs
are rounded *up* onto a coarser grid: every selection returned still fits the
budget exactly (true costs are re-added), but one that needs the rounding
slack can be missed; :attr:`Solution.exact` says which case ran.

Each cell keeps its ``k`` best partial values, with back-pointers, so the
``k`` best overall come from one pass (``O(units · cells · options · k)``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

DEFAULT_MAX_CELLS = 100_000


class InfeasibleBudget(ValueError):
    """No selection fits: even the cheapest option of every unit costs more than the budget."""


@dataclass(frozen=True)
class Selection:
    """One option index per unit, its total cost (input units) and total value."""

    choice: tuple[int, ...]
    cost: int
    value: float


@dataclass(frozen=True)
class Solution:
    """The best selections, best first; ``exact``: no cost rounding was needed; ``cells``: DP table width."""

    selections: list[Selection]
    exact: bool
    cells: int

    @property
    def best(self) -> Selection:
        return self.selections[0]


def _check(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]]) -> None:
    if not costs or len(costs) != len(values):
        raise ValueError("Give costs and values for at least one unit, the same number of units in each.")
    for u, (c, v) in enumerate(zip(costs, values)):
        if not c or len(c) != len(v):
            raise ValueError(f"Unit {u}: give at least one option, with one cost and one value each.")
        if any(int(x) != x or x < 0 for x in c):
            raise ValueError(f"Unit {u}: costs must be non-negative integers, got {list(c)}.")
        if any(not math.isfinite(float(x)) for x in v):
            raise ValueError(f"Unit {u}: values must be finite numbers, got {list(v)}.")


def cost_range(costs: Sequence[Sequence[int]]) -> tuple[int, int]:
    """Total cost of the cheapest and of the dearest selection."""
    return sum(min(c) for c in costs), sum(max(c) for c in costs)


def solve(costs: Sequence[Sequence[int]], values: Sequence[Sequence[float]], budget: int, k: int = 1,
          max_cells: int = DEFAULT_MAX_CELLS) -> Solution:
    """The ``k`` selections of least total value with total cost ≤ ``budget`` (fewer if fewer exist)."""
    _check(costs, values)
    if k < 1:
        raise ValueError(f"Ask for at least one selection, got k={k}.")
    low, _high = cost_range(costs)
    if budget < low:
        raise InfeasibleBudget(f"The budget ({budget:,}) is below the cheapest selection ({low:,}).")
    base = [min(c) for c in costs]
    extra = [[int(x) - b for x in c] for c, b in zip(costs, base)]
    slack = int(budget) - low
    # every reachable cost above the minimum is a multiple of g: the budget's remainder can never be used
    g = reduce(math.gcd, [x for row in extra for x in row if x], 0) or 1
    step, exact = g, True
    if slack // g + 1 > max_cells:
        step, exact = math.ceil(slack / (max_cells - 1)), False
    cells = slack // step + 1
    # reduced costs: exact multiples of g, or rounded up onto the coarse grid (never under-counted)
    reduced = [[-(-x // step) for x in row] for row in extra]

    best = np.full((cells, k), np.inf)
    best[0, 0] = 0.0
    pointers: list[tuple[np.ndarray, np.ndarray]] = []
    for row, vals in zip(reduced, values):
        options = len(row)
        stacked = np.full((cells, options * k), np.inf)
        for j, (dc, v) in enumerate(zip(row, vals)):
            if dc < cells:
                stacked[dc:, j * k:(j + 1) * k] = best[:cells - dc] + float(v)
        order = np.argsort(stacked, axis=1, kind="stable")[:, :k]
        best = np.take_along_axis(stacked, order, axis=1)
        pointers.append((order // k, order % k))  # option chosen, rank of the partial selection it extends

    flat = np.argsort(best.ravel(), kind="stable")[:k]
    ranked = [divmod(int(i), k) for i in flat if np.isfinite(best.ravel()[i])]
    selections = []
    for cell, rank in ranked:
        choice = [0] * len(costs)
        for u in range(len(costs) - 1, -1, -1):
            option, previous = pointers[u][0][cell, rank], pointers[u][1][cell, rank]
            choice[u] = int(option)
            cell, rank = cell - reduced[u][option], int(previous)
        selections.append(Selection(tuple(choice), sum(int(costs[u][j]) for u, j in enumerate(choice)),
                                    float(sum(float(values[u][j]) for u, j in enumerate(choice)))))
    return Solution(selections, exact, cells)
