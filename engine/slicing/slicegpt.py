"""The SliceGPT procedure (docs/methods.md §3 step 2): calibration signals, then rotate and slice.

:func:`rotate_and_slice` works *in place* on a model whose norms are already
fused (:func:`engine.rotation.fuse_norms`) and whose head is untied; callers
pass a copy (see :func:`engine.slicing.slice_model`).

1. :func:`engine.core.capture.capture_layer_inputs` records the first
   layer's input (the embedding output) and the keyword arguments the model
   passes each layer (masks, rotary position embeddings), so any
   architecture's per-layer masks are reproduced exactly.  Signals live on CPU.
2. PCA of the embedding output gives ``Q_0``; the embedding is rotated and
   sliced to ``d_0``.
3. For each layer in turn (moved to the work device, then back): rotate the
   attention inputs by ``Q_in``, run the attention half to get the signal
   between attention and MLP, PCA -> ``Q_mid``; rotate attention output, MLP
   inputs and the attention shortcut; run the MLP half, PCA -> ``Q_out``;
   rotate the MLP output and shortcut.  Each layer therefore sees signals
   that went through the already-sliced earlier layers.
4. The head reads the last layer's (full-width, rotated) output: ``W Q_last``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.core.capture import LayerInputs, capture_layer_inputs, move_to
from engine.slicing.rotation import (
    Covariance,
    pca_basis,
    random_orthogonal,
    rotate_embedding,
    rotate_linear_input,
    rotate_linear_output,
)
from engine.slicing.sliced_layers import LayerWidths, layer_widths, make_sliced_layer, set_shortcut

ProgressFn = Callable[[int, int], None]

# ---------------------------------------------------------------- rotate and slice


@dataclass
class _Context:
    """What every slicing step needs: work device, calibration, rotation generator."""

    device: torch.device
    cal: LayerInputs
    generator: torch.Generator | None
    tokens: int = 0


def _sliced_basis(cov: Covariance, width: int, ctx: _Context) -> torch.Tensor:
    """First ``width`` principal directions ``[D, width]`` (fp64), optionally randomly rotated."""
    _, vectors = pca_basis(cov.matrix)
    basis = vectors[:, :width]
    if ctx.generator is not None:
        basis = basis @ random_orthogonal(width, ctx.generator).to(basis.device)
    ctx.tokens = cov.tokens
    return basis


def _embed(model, architecture, width: int, ctx: _Context) -> tuple[list[torch.Tensor], torch.Tensor]:
    """PCA of the embedding outputs, rotate and slice the embedding; returns signals ``[b, T, d_0]``."""
    cov = Covariance(ctx.cal.hidden[0].shape[-1], ctx.device)
    for x, mask in zip(ctx.cal.hidden, ctx.cal.masks):
        cov.add(x, mask)
    basis = _sliced_basis(cov, width, ctx)
    for path in (architecture.embedding, *architecture.extra_embeddings):  # summed tables share the basis
        rotate_embedding(get_submodule(model, path), basis)
    inputs, ctx.cal.hidden = ctx.cal.hidden, []  # handed over: rotated in place
    return _change_basis(inputs, basis, ctx.device), basis


def _change_basis(signals: list[torch.Tensor], basis: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """Each signal ``[b, T, D] @ basis [D, d]`` on ``device``, back on CPU; replaced in place to save memory."""
    for b, x in enumerate(signals):
        signals[b] = (x.to(device) @ basis.to(x.dtype)).cpu()
    return signals


def _run_half(half, signals, layer_kwargs, masks, device, width: int):
    """Run one half of a layer over all batches: outputs (CPU) and their covariance."""
    outputs, cov = [], Covariance(width, device)
    for b, x in enumerate(signals):
        kwargs = move_to(layer_kwargs[b], device) if layer_kwargs is not None else {}
        y = half(x.to(device), **kwargs)
        cov.add(y, masks[b])
        outputs.append(y.cpu())
    return outputs, cov


def _slice_parallel_layer(layer, arch: Architecture, index: int, signals, q_in, widths: LayerWidths,
                          hidden_size: int, ctx: _Context):
    """Rotate and slice a layer whose attention and MLP read one normed input (Phi-2).

    Both blocks' inputs read ``Q_in``; the layer's full output gives ``Q_out``;
    both blocks' outputs and the one shortcut ``Q_inᵀ Q_out`` are rotated to it.
    Returns (next signals ``[b, T, d_out]``, output basis).
    """
    make_sliced_layer(layer, arch)
    like = get_submodule(layer, arch.attn_output).weight
    for path in arch.attn_inputs + arch.mlp_inputs:
        rotate_linear_input(get_submodule(layer, path), q_in)
    set_shortcut(layer, "attn_shortcut", q_in.T, like)  # input basis -> original D basis
    outs, cov = _run_half(layer.parallel_forward, signals, ctx.cal.layer_kwargs[index], ctx.cal.masks,
                          ctx.device, hidden_size)
    signals.clear()
    q_out = _sliced_basis(cov, widths.d_out, ctx)
    set_shortcut(layer, "attn_shortcut", q_in.T @ q_out, like)
    for path in (arch.attn_output, arch.mlp_output):
        rotate_linear_output(get_submodule(layer, path), q_out)
    return _change_basis(outs, q_out, ctx.device), q_out


def _slice_layer(layer, arch: Architecture, index: int, signals, q_in, widths: LayerWidths, hidden_size, ctx):
    """Rotate and slice one decoder layer; returns (next signals ``[b, T, d_out]``, output basis)."""
    if arch.parallel_blocks:
        return _slice_parallel_layer(layer, arch, index, signals, q_in, widths, hidden_size, ctx)
    make_sliced_layer(layer, arch)
    like = get_submodule(layer, arch.attn_output).weight
    for path in arch.attn_inputs:
        rotate_linear_input(get_submodule(layer, path), q_in)
    set_shortcut(layer, "attn_shortcut", q_in.T, like)  # input basis -> original D basis
    mids, cov = _run_half(layer.attention_half, signals, ctx.cal.layer_kwargs[index], ctx.cal.masks,
                          ctx.device, hidden_size)
    signals.clear()  # the layer's input is no longer needed
    q_mid = _sliced_basis(cov, widths.d_mid, ctx)
    set_shortcut(layer, "attn_shortcut", q_in.T @ q_mid, like)
    rotate_linear_output(get_submodule(layer, arch.attn_output), q_mid)
    for path in arch.mlp_inputs:
        rotate_linear_input(get_submodule(layer, path), q_mid)
    set_shortcut(layer, "mlp_shortcut", q_mid.T, like)  # mid basis -> original D basis
    mids = _change_basis(mids, q_mid, ctx.device)
    outs, cov = _run_half(layer.mlp_half, mids, None, ctx.cal.masks, ctx.device, hidden_size)
    q_out = _sliced_basis(cov, widths.d_out, ctx)
    set_shortcut(layer, "mlp_shortcut", q_mid.T @ q_out, like)
    rotate_linear_output(get_submodule(layer, arch.mlp_output), q_out)
    return _change_basis(outs, q_out, ctx.device), q_out


@torch.no_grad()
def rotate_and_slice(
    model: nn.Module,
    architecture: Architecture,
    input_ids: torch.Tensor,
    dims: list[int],
    *,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    device: torch.device,
    generator: torch.Generator | None = None,
    progress: ProgressFn | None = None,
) -> int:
    """Rotate and slice a norm-fused, untied model in place; returns the calibration token count.

    Every weight it changes is replaced by a new parameter, never written into, so ``model`` may be a
    :func:`~engine.core.sharing.shell_copy` of the base model (it then holds only what slicing makes).

    ``input_ids`` / ``attention_mask`` are ``[n, T]``; ``dims`` has one width
    per layer (wiring: :func:`engine.sliced_layers.layer_widths`).  With a
    ``generator``, every kept basis is multiplied by a random orthogonal
    matrix drawn from it.
    """
    hidden_size = int(get_submodule(model, architecture.embedding).weight.shape[1])
    cal = capture_layer_inputs(model, architecture, input_ids, attention_mask, batch_size=batch_size, device="cpu")
    ctx = _Context(device, cal, generator)
    signals, basis = _embed(model, architecture, dims[0], ctx)
    layers = architecture.decoder_layers(model)
    for index, (layer, widths) in enumerate(zip(layers, layer_widths(dims, hidden_size))):
        home = next(layer.parameters()).device
        if device != home:  # .to() moves parameters in place: give the layer its own before it travels
            layers[index] = layer = copy.deepcopy(layer)
        layer.to(device)
        signals, basis = _slice_layer(layer, architecture, index, signals, basis, widths, hidden_size, ctx)
        layer.to(home)
        if progress is not None:
            progress(index + 1, len(layers))
    rotate_linear_input(get_submodule(model, architecture.head), basis)
    return ctx.tokens
