"""Bits per layer under a size budget: costs, the budget in bits, and the allocations the optimizer competes with.

Sizes are *honest*: a layer at ``b`` bits costs its codes plus the fp16
scale and zero of every group (:func:`engine.quant.grid.weight_storage_bits`),
so 4-bit with groups of 128 is 4.25 bits per weight.  A budget is either

- ``avg_bits``: bits per quantized weight, scales and zeros included, or
- ``total_bytes``: the whole model's bytes, with everything that is not
  quantized (embedding, head, norms) counted at 16 bits.

Both become one number, the bits the decoder layers' linears may use.  The
competitors at the same budget: *uniform* (every layer at the highest level
that fits) and *orderings* (the two levels that bracket the budget, the most
important layers of a queue moved up while they fit), as the layer-wise
quantization paper allocates.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from engine.core.architectures import Architecture
from engine.quant.grid import MAX_BITS, MIN_BITS, QuantizationError, QuantizerSpec
from engine.quant.layer_bits import LayerBits
from engine.quant.size import layer_storage, linear_storage

DEFAULT_LEVELS = (2, 3, 4, 5, 6, 8)
TIE = "+"
"""Joins the linears of a tied unit: ``q+k+v`` gets one level for all three."""


def tie_units(units: Sequence[tuple[int, str | None]], groups: Sequence[tuple[str, ...]],
              values: dict[tuple[int, str | None], list[float]]) -> tuple[list, dict]:
    """Per-linear units with each of ``groups`` (e.g. ``("q", "k", "v")``) joined into one unit per layer, and
    ``values`` (per unit, per level) summed over a group's linears: what a solver chooses when a runtime loads
    those linears as one module with one level."""
    member = {name: group for group in groups for name in group}
    tied: list = []
    summed: dict = {}
    for layer, name in units:
        group = member.get(name)
        if group is None:
            tied.append((layer, name))
            summed[(layer, name)] = values[(layer, name)]
        elif name == group[0]:
            unit = (layer, TIE.join(group))
            tied.append(unit)
            summed[unit] = [sum(column) for column in zip(*(values[(layer, part)] for part in group))]
    return tied, summed


class BudgetError(QuantizationError):
    """A budget or level set the optimizer cannot work with; the message names the feasible range."""


def check_levels(levels: Sequence[int]) -> tuple[int, ...]:
    """Sorted distinct levels; refuses an empty set and levels outside ``MIN_BITS..MAX_BITS``."""
    chosen = tuple(sorted(set(int(b) for b in levels)))
    if not chosen:
        raise BudgetError(f"Choose at least one bit level (from {MIN_BITS} to {MAX_BITS}, e.g. 2,3,4,8).")
    outside = [b for b in chosen if not MIN_BITS <= b <= MAX_BITS]
    if outside:
        raise BudgetError(f"Bit levels {outside} are out of range: choose levels from {MIN_BITS} to {MAX_BITS}.")
    return chosen


@dataclass(frozen=True)
class LayerCosts:
    """Storage of every decoder layer's linears at every level.

    ``bits[i][j]``: bits of layer ``i`` at ``levels[j]`` (codes, scales, zeros); ``module_bits[i][name][j]``:
    the same for the layer's linear ``name`` alone; ``weights[i]``: the layer's weight count;
    ``unquantized_params``: parameters that stay at 16 bits (embedding, head, norms, biases).
    """

    levels: tuple[int, ...]
    bits: list[list[int]]
    weights: list[int]
    unquantized_params: int
    module_bits: list[dict[str, list[int]]] = field(default_factory=list)
    fixed_bytes: float | None = None  # bytes outside the decoder linears as deployed (GGUF); None: 16 bits each

    @property
    def fixed(self) -> float:
        """Bytes of everything but the decoder linears: the format's (``fixed_bytes``) or 16 bits per parameter."""
        return self.fixed_bytes if self.fixed_bytes is not None else 2 * self.unquantized_params

    @property
    def total_weights(self) -> int:
        return sum(self.weights)

    def units(self, granularity: str) -> list[tuple[int, str | None]]:
        """What the optimizer chooses a level for: ``(layer, None)`` per layer, or ``(layer, linear)``."""
        if granularity == "layer":
            return [(i, None) for i in range(len(self.bits))]
        return [(i, name) for i, names in enumerate(self.module_bits) for name in names]

    def unit_bits(self, unit: tuple[int, str | None]) -> list[int]:
        """Storage bits of one unit at each level (a tied unit ``q+k+v``: its linears together)."""
        layer, name = unit
        if name is None:
            return self.bits[layer]
        rows = [self.module_bits[layer][part] for part in name.split(TIE)]
        return [sum(column) for column in zip(*rows)]

    def total_bits(self, per_layer: Sequence[LayerBits]) -> int:
        """Storage bits of an allocation (one level per layer, or a level per linear)."""
        total = 0
        for i, entry in enumerate(per_layer):
            if isinstance(entry, int):
                total += self.bits[i][self.levels.index(entry)]
            else:
                total += sum(row[self.levels.index(entry[name])] for name, row in self.module_bits[i].items())
        return total

    def avg_bits(self, per_layer: Sequence[LayerBits]) -> float:
        """Honest bits per quantized weight of an allocation."""
        return self.total_bits(per_layer) / self.total_weights

    def model_bytes(self, per_layer: Sequence[LayerBits]) -> float:
        """Whole-model bytes of an allocation, the rest as :attr:`fixed` counts it."""
        return self.total_bits(per_layer) / 8 + self.fixed


def layer_costs(model: nn.Module, arch: Architecture, levels: Sequence[int], spec: QuantizerSpec,
                packed_zeros: bool = False) -> LayerCosts:
    """Honest storage of each layer of ``model``, and of each of its linears, at each of ``levels`` with
    ``spec``'s grid (group size, g_idx; ``packed_zeros``: integer zero points as a compressed-tensors checkpoint
    stores them)."""
    levels = check_levels(levels)
    bits, weights, modules, quantized = [], [], [], set()
    for layer in arch.decoder_layers(model):
        per_linear = {name: [linear_storage(linear, b, spec, packed_zeros) for b in levels]
                      for name, linear in arch.layer_linears(layer).items()}
        modules.append(per_linear)
        bits.append([sum(row[j] for row in per_linear.values()) for j in range(len(levels))])  # the layer's sum
        _bits, n_weights, ids = layer_storage(arch, layer, levels[0], spec, packed_zeros)
        weights.append(n_weights)
        quantized.update(ids)
    unquantized = sum(p.numel() for p in model.parameters() if id(p) not in quantized)
    return LayerCosts(levels, bits, weights, unquantized, modules)


@dataclass(frozen=True)
class BitBudget:
    """A size budget: ``avg_bits`` per quantized weight (honest) or the model's ``total_bytes``; one of them."""

    avg_bits: float | None = None
    total_bytes: float | None = None

    def __post_init__(self) -> None:
        if (self.avg_bits is None) == (self.total_bytes is None):
            raise BudgetError("Give the budget as average bits per weight or as total bytes (one of them).")

    def label(self) -> str:
        if self.avg_bits is not None:
            return f"{self.avg_bits:g} bits per weight"
        return f"{self.total_bytes / 2**20:.1f} MiB"

    def layer_bits(self, costs: LayerCosts) -> int:
        """The bits the decoder layers may use; refuses budgets outside what ``costs.levels`` can reach."""
        budget = (self.avg_bits * costs.total_weights if self.avg_bits is not None
                  else 8 * (self.total_bytes - costs.fixed))
        low = sum(row[0] for row in costs.bits)
        high = sum(row[-1] for row in costs.bits)
        if not low <= budget <= high:
            lo_avg, hi_avg = low / costs.total_weights, high / costs.total_weights
            lo_mib = (low / 8 + costs.fixed) / 2**20
            hi_mib = (high / 8 + costs.fixed) / 2**20
            side = "below the smallest" if budget < low else "above the largest"
            raise BudgetError(
                f"A budget of {self.label()} is {side} size these levels {list(costs.levels)} can give: choose "
                f"{lo_avg:.3f}–{hi_avg:.3f} bits per weight (scales and zeros included), i.e. "
                f"{lo_mib:.1f}–{hi_mib:.1f} MiB for the whole model, or change the levels.")
        return int(budget)


GRANULARITIES = ("layer", "module")


def uniform_bits(costs: LayerCosts, budget_bits: int) -> list[int]:
    """Every layer at the highest level that fits the budget."""
    fitting = [b for j, b in enumerate(costs.levels) if sum(row[j] for row in costs.bits) <= budget_bits]
    if not fitting:
        raise BudgetError("Not even the lowest level fits this budget.")
    return [fitting[-1]] * len(costs.bits)


def ordering_bits(costs: LayerCosts, budget_bits: int, order: Sequence[int]) -> list[int]:
    """Two levels bracketing the budget; layers move up from the lower one, most important first (``order``:
    least important first, as :func:`engine.quant.allocation.layer_order` gives), while the budget allows."""
    bits = uniform_bits(costs, budget_bits)
    j = costs.levels.index(bits[0])
    if j + 1 == len(costs.levels):
        return bits
    spent = costs.total_bits(bits)
    for layer in reversed(list(order)):
        step = costs.bits[layer][j + 1] - costs.bits[layer][j]
        if spent + step <= budget_bits:
            bits[layer], spent = costs.levels[j + 1], spent + step
    return bits
