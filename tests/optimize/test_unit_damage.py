"""The bits optimizer's per-unit damage: levels per unit back to per-layer bits, and the summed damage of an
allocation (pure functions, no model)."""

from __future__ import annotations

import math

from engine.optimize.bit_budget import LayerCosts
from engine.optimize.unit_damage import allocation_from_units, summed_damage

COSTS = LayerCosts(levels=(4, 8), bits=[[40, 80], [40, 80]], weights=[10, 10], unquantized_params=0,
                   module_bits=[{"q": [20, 40], "k": [20, 40]}, {"q": [20, 40], "k": [20, 40]}])


def test_levels_per_unit_become_per_layer_bits_and_tied_units_give_each_linear_their_level():
    assert allocation_from_units([(0, None), (1, None)], [4, 8], 2) == [4, 8]
    per_linear = allocation_from_units([(0, "q"), (0, "k"), (1, "q"), (1, "k")], [4, 8, 8, 8], 2)
    assert per_linear == [{"q": 4, "k": 8}, 8]  # a layer whose linears agree is one level
    assert allocation_from_units([(0, "q+k"), (1, "q+k")], [8, 4], 2) == [8, 4]


def test_summed_damage_adds_each_units_damage_at_its_level():
    per_layer = {(0, None): [0.5, 0.0], (1, None): [0.25, 0.01]}
    assert summed_damage([4, 8], per_layer, COSTS) == 0.5 + 0.01
    assert math.isnan(summed_damage([{"q": 4, "k": 8}, 8], per_layer, COSTS))  # per-linear bits, per-layer damage
    per_linear = {(0, "q"): [0.3, 0.0], (0, "k"): [0.1, 0.0], (1, "q"): [0.2, 0.0], (1, "k"): [0.4, 0.02]}
    assert math.isclose(summed_damage([{"q": 4, "k": 8}, 8], per_linear, COSTS), 0.3 + 0.0 + 0.0 + 0.02)
    assert math.isclose(summed_damage([4, 4], per_linear, COSTS), 1.0)  # a whole-layer level sums its linears
