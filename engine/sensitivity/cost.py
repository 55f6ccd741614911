"""What a sensitivity scan costs, in forward-equivalents (docs/methods.md §6).

Unit: one *forward-equivalent* is one dense forward pass (every layer and the
head) over the calibration sample.  Per token, a layer costs the
multiply-accumulates of its linear weights (attention and MLP separately),
the head its ``V × D`` weight; attention-score products and norms are left
out (small at the short windows used here, and identical on both sides).

Measuring layer ``i`` re-runs layer ``i`` (modified), layers ``i+1..L-1`` and
the head from the cached input of layer ``i``; summed over all layers this is
about ``L/2`` forwards plus ``L`` heads per action instead of ``L`` full
forwards.  Slicing adds a pass of the layer's attention half (for the PCA of
the mid residual), GPTQ a pass of the layer (for the Hessians); the dense
reference costs one forward plus one head-sized product, once per scan.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.sensitivity.actions import Action


@dataclass(frozen=True)
class LayerCosts:
    """Multiply-accumulates per token: ``attention[i]`` / ``mlp[i]`` of layer ``i``, and the ``head``."""

    attention: tuple[int, ...]
    mlp: tuple[int, ...]
    head: int

    @property
    def num_layers(self) -> int:
        return len(self.attention)

    def layer(self, index: int) -> int:
        return self.attention[index] + self.mlp[index]

    @property
    def forward(self) -> int:
        """One dense forward (all layers and the head), per token."""
        return sum(self.attention) + sum(self.mlp) + self.head

    def tail(self, first: int) -> int:
        """Layers ``first..L-1`` and the head, per token."""
        return sum(self.layer(j) for j in range(first, self.num_layers)) + self.head


def layer_costs(model: nn.Module, architecture: Architecture) -> LayerCosts:
    """Per-token multiply-accumulates of every layer's attention and MLP linears, and of the head."""
    attention, mlp = [], []
    attn_prefix = architecture.attention + "."
    for layer in architecture.decoder_layers(model):
        present = architecture.layer_linears(layer)  # a block dropped from the layer has no linears
        weights = {architecture.linears[name]: linear.weight.numel() for name, linear in present.items()}
        attention.append(sum(n for path, n in weights.items() if path.startswith(attn_prefix)))
        mlp.append(sum(n for path, n in weights.items() if not path.startswith(attn_prefix)))
    head = get_submodule(model, architecture.head).weight.numel()
    return LayerCosts(tuple(attention), tuple(mlp), head)


def layer_step_cost(costs: LayerCosts, action: Action, index: int) -> int:
    """Per-token cost of measuring ``action`` on layer ``index``: preparation, the modified layer, the tail."""
    layer = costs.layer(index)
    own = {"rtn": layer, "llama.cpp": layer, "gptq": 2 * layer, "slice": costs.attention[index] + layer, "drop": 0,
           "drop-attn": costs.mlp[index], "drop-mlp": costs.attention[index]}[action.kind]
    return own + costs.tail(index + 1)


def action_forward_equivalents(costs: LayerCosts, action: Action) -> float:
    """Forward-equivalents of one full scan of ``action`` over all layers (dense reference not included)."""
    return sum(layer_step_cost(costs, action, i) for i in range(costs.num_layers)) / costs.forward


def dense_forward_equivalents(costs: LayerCosts) -> float:
    """The dense reference pass: one forward plus the head-sized product ``p·W`` (expected head rows)."""
    return (costs.forward + costs.head) / costs.forward
