"""What the bits optimizer's candidates compete with at the same budget: uniform bits, the LIM / ZD / random
orderings, and (in llama.cpp's types) the largest stock presets that fit."""

from __future__ import annotations

from engine.core.data import DataSpec
from engine.core.models import LoadedModel
from engine.core.progress import StageProgress
from engine.optimize.bit_budget import LayerCosts, ordering_bits, uniform_bits
from engine.quant.allocation import layer_order
from engine.quant.layer_bits import LayerBits, all_levels
from engine.runs.cached_scores import compute_scores
from engine.runs.store import ResultsStore
from engine.scores.ranking import zd_importance

PRESETS_CHECKED = 2
"""llama.cpp presets measured beside the optimizer's candidates: the largest that fit the budget."""
PRESET_SLACK = 1.001
"""A preset fits when its bits are within 0.1% of the budget (file padding the per-layer costs do not see)."""


def presets_that_fit(loaded: LoadedModel, costs: LayerCosts, budget_bits: int) -> dict[str, list[LayerBits]]:
    """llama.cpp's stock presets that fit the budget, as allocations (the largest :data:`PRESETS_CHECKED`)."""
    from engine.export.llamacpp_presets import PRESETS, preset_bits

    found = {}
    for preset in reversed(PRESETS):
        try:
            bits = preset_bits(loaded, preset)
        except RuntimeError:  # llama-quantize's dry run failed: the solver and orderings still compete
            bits = None
        if bits is None or not set(all_levels(bits)) <= set(costs.levels):
            continue
        if costs.total_bits(bits) <= budget_bits * PRESET_SLACK:
            found[f"llama.cpp {preset}"] = bits
        if len(found) == PRESETS_CHECKED:
            break
    return found


def competitors(store: ResultsStore, loaded: LoadedModel, calibration: DataSpec, costs: LayerCosts,
                budget_bits: int, progress: StageProgress | None) -> dict[str, list[LayerBits]]:
    """Uniform and the LIM / ZD / random orderings at the same budget."""
    lr, zd, _hit = compute_scores(store, loaded, calibration, progress=progress)
    n = loaded.num_layers
    orders = {"LIM ordering": layer_order(n, "importance", lr.lim),
              "ZD ordering": layer_order(n, "importance", zd_importance(zd.zd_layer)),
              "random ordering": layer_order(n, "random", seed=0)}
    found = {"uniform": uniform_bits(costs, budget_bits)}
    found.update({name: ordering_bits(costs, budget_bits, order) for name, order in orders.items()})
    return found
