"""One decoder layer with one action applied: a modified copy or a wrapper, never the shared layer changed.

Every builder gets the layer (read-only), its architecture entry, the action
and ``batches``: a callable yielding ``(input [b, T, D], keyword arguments)``
for every calibration batch of that layer's *dense* input (needed by GPTQ's
Hessians and by the slicing PCA).  It returns a module to call like the
layer, ``module(hidden_states, **kwargs) -> [b, T, D]`` (``None`` for a
dropped layer: its output is its input), plus a dict of facts for the record.

- **Quantization** (RTN or GPTQ): a deep copy of the layer whose linear
  weights are replaced by ``QuantizedWeight.dequantize()``.  GPTQ's Hessians
  come from the dense layer's inputs (``propagation="dense"``: only this
  layer is quantized, so its inputs are the dense ones).
- **Drop attention / MLP**: a wrapper adding only the other block's update
  to the residual (the blocks are the shared layer's own submodules, called).
- **Slicing** by a fraction ``f`` (keep ``d`` of ``D`` residual dimensions),
  as :func:`engine.slicing.slice_model.slice_model` would do with dims
  ``[D, …, D, d, D, …, D]`` (``d`` at layer ``i``).  With norms fused and the
  layers before ``i`` rotated without loss, SliceGPT (a) projects the stream
  entering layer ``i`` onto its top-``d`` principal directions ``Q_in``
  (layer ``i − 1``'s output, or the embedding, is sliced to ``d``), (b) lets
  the attention read that projected stream (the weightless RMSNorm of the
  ``d`` kept coordinates with divisor ``D`` equals the RMS of the projected
  ``D``-wide vector, so ``norm(x Q_in Q_inᵀ)`` with the original scale is the
  same thing), (c) projects the mid residual ``x Q_in Q_inᵀ + attn(…)`` onto
  *its* top-``d`` directions ``Q_mid`` (PCA of the mid signals computed with
  the already projected input, as SliceGPT's layer-by-layer procedure does),
  and (d) writes the full width again (layer ``i + 1`` reads ``D``: its
  rotation loses nothing).  So slicing layer ``i`` alone is exactly

      h = x P_in,   m = (h + attn(norm₁(h))) P_mid,   y = m + mlp(norm₂(m)),   P = Q Qᵀ,

  which :class:`ProjectedLayer` computes around the unmodified layer, with
  fp64 PCA (``engine.slicing.rotation``: damped covariance, eigenvectors by
  decreasing eigenvalue).  ``tests/sensitivity`` checks it against the real
  ``slice_model``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.quant.ggml_weight import ggml_quantize
from engine.quant.gptq import HessianAccumulator, quantize_weight
from engine.quant.grid import LLAMACPP, rtn_quantize
from engine.sensitivity.actions import QUANT_KINDS, Action
from engine.slicing.rotation import Covariance, compute_dtype, pca_basis

Batches = Callable[[], Iterable[tuple[torch.Tensor, dict]]]
"""Yields ``(layer input [b, T, D], layer keyword arguments)`` per calibration batch, on the layer's device."""


def attention_update(layer: nn.Module, arch: Architecture, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """What the attention block adds to the residual ``hidden`` ``[b, T, D]`` (after its residual dropout)."""
    normed = get_submodule(layer, arch.attn_norm)(hidden)
    update, _ = get_submodule(layer, arch.attention)(hidden_states=normed, **kwargs)
    if arch.attn_residual_dropout:
        update = get_submodule(layer, arch.attn_residual_dropout)(update)
    return update * getattr(layer, arch.residual_multiplier) if arch.residual_multiplier else update


def mlp_update(layer: nn.Module, arch: Architecture, hidden: torch.Tensor) -> torch.Tensor:
    """What the MLP block adds to the residual ``hidden`` ``[b, T, D]`` (after its residual dropout)."""
    update = get_submodule(layer, arch.mlp)(get_submodule(layer, arch.mlp_norm)(hidden))
    if arch.mlp_residual_dropout:
        update = get_submodule(layer, arch.mlp_residual_dropout)(update)
    return update * getattr(layer, arch.residual_multiplier) if arch.residual_multiplier else update


class _Wrapper(nn.Module):
    """Calls submodules of a layer it does not own (kept out of the module tree: nothing is registered on it)."""

    def __init__(self, layer: nn.Module, arch: Architecture) -> None:
        super().__init__()
        self.__dict__["base"] = layer  # plain attribute: not a child module, never moved or copied by us
        self.arch = arch


class WithoutAttention(_Wrapper):
    """The layer with its attention block removed: ``y = x + mlp(norm₂(x))``."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return hidden_states + mlp_update(self.base, self.arch, hidden_states)


class WithoutMLP(_Wrapper):
    """The layer with its MLP block removed: ``y = x + attn(norm₁(x))``."""

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        return hidden_states + attention_update(self.base, self.arch, hidden_states, kwargs)


def project(hidden: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``hidden [.., D]`` projected onto the span of ``basis [D, d]`` (orthonormal columns): ``x Q Qᵀ``.

    Computed in ``compute_dtype`` (fp32, or fp64 for fp64 signals), returned in ``hidden``'s dtype.
    """
    work = compute_dtype(hidden.dtype)
    q = basis.to(hidden.device, work)
    return ((hidden.to(work) @ q) @ q.T).to(hidden.dtype)


class ProjectedLayer(_Wrapper):
    """Layer ``i`` as SliceGPT slices it alone (module docstring): input and mid residual projected to ``d`` dims.

    ``q_in`` / ``q_mid``: ``[D, d]`` top principal directions (fp64) of the
    layer's input and of its mid residual.
    """

    def __init__(self, layer: nn.Module, arch: Architecture, q_in: torch.Tensor, q_mid: torch.Tensor) -> None:
        super().__init__(layer, arch)
        self.q_in, self.q_mid = q_in, q_mid

    def mid(self, hidden_states: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The mid residual before its projection: ``x P_in + attn(norm₁(x P_in))``."""
        h = project(hidden_states, self.q_in)
        return h + attention_update(self.base, self.arch, h, kwargs)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        m = project(self.mid(hidden_states, kwargs), self.q_mid)
        return m + mlp_update(self.base, self.arch, m)


def _top_directions(covariance: Covariance, width: int) -> torch.Tensor:
    """First ``width`` principal directions ``[D, width]`` (fp64) of an accumulated covariance."""
    _, vectors = pca_basis(covariance.matrix)
    return vectors[:, :width].contiguous()


@torch.no_grad()
def sliced_layer(layer: nn.Module, arch: Architecture, action: Action, batches: Batches) -> tuple[nn.Module, dict]:
    """:class:`ProjectedLayer` with PCA bases from the calibration batches (one attention-half pass)."""
    width = int(get_submodule(layer, arch.attn_norm).weight.shape[0])
    kept = action.kept_dims(width)
    device = next(layer.parameters()).device
    cov_in = Covariance(width, device)
    for x, _kwargs in batches():
        cov_in.add(x)
    wrapper = ProjectedLayer(layer, arch, _top_directions(cov_in, kept), torch.empty(0))
    cov_mid = Covariance(width, device)
    for x, kwargs in batches():
        cov_mid.add(wrapper.mid(x, kwargs))
    wrapper.q_mid = _top_directions(cov_mid, kept)
    return wrapper, {"kept_dims": kept, "hidden_size": width}


def _hessians(layer: nn.Module, arch: Architecture, batches: Batches) -> dict[str, torch.Tensor]:
    """Input Hessian of every linear of ``layer`` (a private copy: hooks go on it) over the batches."""
    linears = arch.layer_linears(layer)
    accumulators = {name: HessianAccumulator(linear.in_features, linear.weight.device)
                    for name, linear in linears.items()}
    handles = [linear.register_forward_pre_hook(lambda _m, args, acc=accumulators[name]: acc.add(args[0]))
               for name, linear in linears.items()]
    try:
        for x, kwargs in batches():
            layer(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.hessian() for name, acc in accumulators.items()}


@torch.no_grad()
def quantized_layer(layer: nn.Module, arch: Architecture, action: Action,
                    batches: Batches) -> tuple[nn.Module, dict]:
    """A deep copy of ``layer`` with every linear weight (or only ``action.module``'s) quantized and dequantized
    (RTN or GPTQ)."""
    spec = action.quantizer()
    quantized = copy.deepcopy(layer)
    hessians = _hessians(quantized, arch, batches) if spec.method == "gptq" else {}
    bits = weights = 0
    for name, linear in arch.layer_linears(quantized).items():
        if action.module is not None and name != action.module:
            continue
        weight = linear.weight
        if spec.method == LLAMACPP:
            result = ggml_quantize(weight, spec.bits, spec.ggml_types)
        elif spec.method == "gptq":
            result = quantize_weight(weight, spec, hessians[name])
        else:
            result = rtn_quantize(weight, spec)
        weight.copy_(result.dequantize(weight.dtype).to(weight.device))
        bits += result.storage_bits()
        weights += weight.numel()
    return quantized, {"bits_per_weight": bits / weights, "quantizer": spec.label()}


def layer_for_action(layer: nn.Module, arch: Architecture, action: Action,
                     batches: Batches) -> tuple[nn.Module | None, dict]:
    """The modified layer for ``action`` (``None``: the layer is dropped) and facts about it."""
    if action.kind in QUANT_KINDS:
        return quantized_layer(layer, arch, action, batches)
    if action.kind == "slice":
        return sliced_layer(layer, arch, action, batches)
    if action.kind == "drop-attn":
        return WithoutAttention(layer, arch), {}
    if action.kind == "drop-mlp":
        return WithoutMLP(layer, arch), {}
    return None, {}
