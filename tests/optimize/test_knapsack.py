"""The budget solver against brute force: exact optimum, the k best in order, budget respected exactly."""

from __future__ import annotations

import itertools
import random

import pytest

from engine.optimize.knapsack import InfeasibleBudget, solve


def _brute_force(costs, values, budget):
    """Every selection that fits, best first (value, then cost)."""
    fits = []
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        cost = sum(costs[u][j] for u, j in enumerate(choice))
        if cost <= budget:
            fits.append((sum(values[u][j] for u, j in enumerate(choice)), cost, choice))
    return sorted(fits)


@pytest.mark.parametrize("seed", range(25))
def test_the_k_best_selections_equal_brute_force(seed):
    rng = random.Random(seed)
    units, options = rng.randint(1, 5), rng.randint(1, 4)
    costs = [[rng.randint(0, 9) * rng.choice([1, 3]) for _ in range(options)] for _ in range(units)]
    values = [[rng.uniform(0, 10) for _ in range(options)] for _ in range(units)]
    low, high = sum(map(min, costs)), sum(map(max, costs))
    budget = rng.randint(low, high)
    expected = _brute_force(costs, values, budget)
    solution = solve(costs, values, budget, k=4)
    assert solution.exact
    assert [s.value for s in solution.selections] == pytest.approx([e[0] for e in expected[:4]])
    for selection in solution.selections:
        assert selection.cost <= budget
        assert selection.cost == sum(costs[u][j] for u, j in enumerate(selection.choice))
    assert len({s.choice for s in solution.selections}) == len(solution.selections)  # all different


def test_large_costs_are_reduced_by_their_common_divisor_and_stay_exact():
    """Bit costs are multiples of a layer's weight count: the table stays small and the result exact."""
    weights = 576 * 192
    costs = [[weights * b + 4_000 for b in (2, 3, 4, 8)] for _ in range(6)]
    values = [[1.0 / b + 0.01 * u for b in (2, 3, 4, 8)] for u in range(6)]
    budget = sum(c[1] for c in costs) + 2 * weights  # 3 bits everywhere, plus two more bits to spend
    solution = solve(costs, values, budget, k=3)
    assert solution.exact and solution.cells == 9  # slack of 8 weight-counts above all-2-bit: 9 cells
    assert solution.best.value == pytest.approx(_brute_force(costs, values, budget)[0][0])


def test_when_rounding_is_needed_the_budget_still_holds():
    rng = random.Random(3)
    costs = [[rng.randint(1, 10**6) for _ in range(3)] for _ in range(8)]
    values = [[rng.uniform(0, 1) for _ in range(3)] for _ in range(8)]
    budget = sum(map(min, costs)) + 10**6
    solution = solve(costs, values, budget, k=2, max_cells=500)
    assert not solution.exact
    assert all(s.cost <= budget for s in solution.selections)
    best = _brute_force(costs, values, budget)[0][0]
    assert best <= solution.best.value <= best * 1.5  # near-optimal, never infeasible


def test_infeasible_and_bad_input():
    with pytest.raises(InfeasibleBudget, match="below the cheapest"):
        solve([[5, 6], [5]], [[0, 0], [0]], 9)
    with pytest.raises(ValueError, match="at least one option"):
        solve([[1], []], [[0], []], 5)
    with pytest.raises(ValueError, match="non-negative integers"):
        solve([[1.5]], [[0.0]], 5)


def test_thirty_layers_by_seven_modules_by_six_levels_solves_quickly():
    """The bench's size (210 units × 6 levels, the module shapes of the built-in model)."""
    shapes = [576 * 576, 576 * 192, 576 * 192, 576 * 576, 576 * 1536, 576 * 1536, 1536 * 576] * 30
    levels = (2, 3, 4, 5, 6, 8)
    rng = random.Random(0)
    costs = [[n * b + n // 4 for b in levels] for n in shapes]
    values = [[rng.uniform(0, 1) / b for b in levels] for _ in shapes]
    budget = int(sum(n * 3.5 for n in shapes))
    solution = solve(costs, values, budget, k=3)  # bench/optimize.py measures how long this takes
    assert solution.exact and solution.best.cost <= budget
    assert solution.best.value <= min(s.value for s in solution.selections)


def test_an_odd_budget_does_not_break_exactness():
    """The budget's remainder after the cost grid cannot be spent: it must not shrink the grid (review finding)."""
    weights = 576 * 1536
    costs = [[weights * b for b in (2, 3, 4, 8)] for _ in range(30)]
    values = [[1.0 / b + 0.001 * u for b in (2, 3, 4, 8)] for u in range(30)]
    budget = sum(c[1] for c in costs) + 7 * weights + 12_345  # not a multiple of anything useful
    solution = solve(costs, values, budget)
    assert solution.exact and solution.cells == 7 + 30 + 1
    assert solution.best.cost <= budget
