"""What a model's decoder layers are given: the one layer-input capture utility.

Layer-by-layer algorithms (SliceGPT's rotate-and-slice, GPTQ) run one
decoder layer at a time over calibration signals.  They need the first
layer's hidden-state input (the embedding output) and the keyword arguments
the model passes every layer (attention masks, rotary position embeddings,
position ids, ...), so that running a layer by hand reproduces exactly what
the full model would do, for any supported architecture (per-layer masks
such as sliding windows included).

:func:`capture_layer_inputs` runs the model once per batch with every decoder
layer's ``forward`` replaced by a stub that records its arguments and passes
the hidden state through; the last layer's stub stops the forward (nothing
after it is needed: no final norm, no head).  The stubs are instance
attributes removed again in a ``finally`` block (an own ``forward`` that was
already there, e.g. an accelerate hook, is put back), so the model is left as
it was.  While the capture runs the model is *not* usable by another thread:
call it on a copy (the engine always does: slicing and quantization work on
deep copies of the loaded model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.core.architectures import Architecture, get_submodule


class _StopForward(Exception):
    """Raised by the last layer's stub: the capture needs nothing past it."""


@dataclass
class LayerInputs:
    """What the decoder layers receive, batch by batch.

    ``hidden[b]``: the first layer's hidden-state input of batch ``b``,
    ``[batch, seqlen, hidden]`` (the embedding output, model dtype).
    ``layer_kwargs[i][b]``: the keyword arguments layer ``i`` is called with
    for batch ``b`` (tensors inside nested tuples / dicts; a tensor the model
    passes to several layers is stored once per batch).  ``masks[b]``: the
    token mask ``[batch, seqlen]`` given for batch ``b``, as given (``None``
    when none was given).  The other tensors live on the ``device`` chosen at
    capture time.
    """

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict]]
    masks: list[torch.Tensor | None]

    @property
    def n_batches(self) -> int:
        return len(self.hidden)

    def kwargs_for(self, layer: int, batch: int, device: torch.device | str | None = None) -> dict:
        """Layer ``layer``'s keyword arguments for batch ``batch`` (moved to ``device`` if given)."""
        kwargs = self.layer_kwargs[layer][batch]
        return kwargs if device is None else move_to(kwargs, device)


def move_to(obj, device: torch.device | str, memo: dict | None = None):
    """``obj`` with every tensor inside (nested tuples / lists / dicts) detached and moved to ``device``.

    ``memo`` (id -> moved tensor) makes a tensor that appears several times
    move once; non-tensor leaves are returned as they are.
    """
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.detach().to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device, memo) for k, v in obj.items()}
    return obj


def _stub(index: int, last: int, inputs: LayerInputs, device: torch.device | str, memo: dict):
    """A ``forward`` for decoder layer ``index`` that records its input and arguments."""

    def forward(hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("Layer-input capture expects decoder layers to be called with the hidden state "
                            "positionally and everything else by keyword.")
        if index == 0:
            inputs.hidden.append(hidden_states.detach().to(device))
        inputs.layer_kwargs[index].append(move_to(kwargs, device, memo))
        if index == last:
            raise _StopForward
        return hidden_states

    return forward


@torch.no_grad()
def capture_layer_inputs(
    model: nn.Module,
    architecture: Architecture,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> LayerInputs:
    """Record the first decoder layer's input and every layer's keyword arguments.

    ``input_ids`` / ``attention_mask``: ``[n, seqlen]``, fed ``batch_size``
    rows at a time to the model's own device.  ``device``: where the recorded
    tensors are kept (``"cpu"`` to spare accelerator memory, or the model's
    device to avoid transfers).  The model is restored before returning (see
    the module docstring: not for a model another thread is using).
    """
    layers = architecture.decoder_layers(model)
    model_device = get_submodule(model, architecture.embedding).weight.device
    inputs = LayerInputs(hidden=[], layer_kwargs=[[] for _ in layers], masks=[])
    memo: dict = {}
    own_forwards = [layer.__dict__.get("forward") for layer in layers]  # e.g. accelerate hooks
    for index, layer in enumerate(layers):
        layer.forward = _stub(index, len(layers) - 1, inputs, device, memo)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            memo.clear()  # tensors are shared between the layers of one batch only
            ids = input_ids[start : start + batch_size]
            mask = None if attention_mask is None else attention_mask[start : start + batch_size]
            inputs.masks.append(mask)
            try:
                model(input_ids=ids.to(model_device),
                      attention_mask=None if mask is None else mask.to(model_device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for layer, own in zip(layers, own_forwards):
            del layer.forward
            if own is not None:
                layer.forward = own
    return inputs
