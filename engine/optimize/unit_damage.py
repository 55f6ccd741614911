"""Per-unit damage for the bits optimizer: from sensitivity scans to what the solver sums, and back to bits.

A *unit* is ``(layer, linear)``: a whole layer (``linear`` is ``None``, granularity ``layer``), one linear
(``"q"``), or a tied group of linears a runtime loads as one module (``"q+k+v"``, :data:`TIE`).  Damages are
nats/token on calibration windows, one value per allowed level.
"""

from __future__ import annotations

from engine.optimize.bit_budget import TIE, LayerCosts
from engine.optimize.damage import blended
from engine.quant.layer_bits import LayerBits, normalize

Unit = tuple[int, "str | None"]  # (layer, linear short name or None for the whole layer)


def unit_scans(damages: list, costs: LayerCosts, granularity: str, linears: list[str]) -> dict[Unit, list]:
    """``{unit: [the scan of its action at each level]}`` from scans in :meth:`BitsOptimizerPlan.actions` order
    (level-major, then linear); a unit's values are at index ``layer`` of each scan."""
    modules = [None] if granularity == "layer" else linears
    return {(layer, name): [damages[j * len(modules) + modules.index(name)] for j in range(len(costs.levels))]
            for layer, name in costs.units(granularity)}


def unit_damage(damages: list, costs: LayerCosts, granularity: str,
                linears: list[str]) -> dict[str, dict[Unit, list[float]]]:
    """``{"kl": {unit: [damage at each level]}, "dnll": ..., "blended": ...}`` (nats/token) from the scans."""
    out: dict[str, dict[Unit, list[float]]] = {"kl": {}, "dnll": {}, "blended": {}}
    for unit, columns in unit_scans(damages, costs, granularity, linears).items():
        layer = unit[0]
        out["kl"][unit] = [d.kl[layer] for d in columns]
        out["dnll"][unit] = [d.delta_nll[layer] for d in columns]
        out["blended"][unit] = blended(out["kl"][unit], out["dnll"][unit],
                                       [d.window_delta_nll[layer] for d in columns])
    return out


def allocation_from_units(units: list[Unit], levels: list[int], n_layers: int) -> list[LayerBits]:
    """One entry per layer from one level per unit (a layer whose linears agree becomes one level)."""
    per_layer: list[dict] = [{} for _ in range(n_layers)]
    for (layer, name), b in zip(units, levels):
        if name is None:
            per_layer[layer] = b
        else:
            per_layer[layer].update(dict.fromkeys(name.split(TIE), b))  # a tied unit: each of its linears
    return [normalize(entry) for entry in per_layer]


def summed_damage(bits: list[LayerBits], damage: dict[Unit, list[float]], costs: LayerCosts) -> float:
    """Summed per-unit damage of an allocation; a whole-layer level under module granularity sums its linears."""
    total = 0.0
    for layer, entry in enumerate(bits):
        if (layer, None) in damage:  # layer granularity: entries are levels
            if not isinstance(entry, int):
                return float("nan")  # a level per linear (a llama.cpp preset): not predicted per layer
            total += damage[(layer, None)][costs.levels.index(entry)]
            continue
        for name in costs.module_bits[layer]:
            level = entry if isinstance(entry, int) else entry[name]
            total += damage[(layer, name)][costs.levels.index(level)]
    return total
