"""Quantized variants that hold packed codes, not weights, and share the base model's other tensors.

A quantized what-if needs no full-precision copy of the model:
:func:`quantized_variant` gives it its own module tree over the base model's
tensors (:func:`engine.core.sharing.shell_copy`) and replaces each decoder
linear by a :class:`QuantizedLinear`, which holds the packed codes (2-bit
codes four to a byte, 3/4-bit two, 5-8-bit one; :mod:`engine.quant.packing`),
fp16 scales and zero points (the very tensors of the
:class:`~engine.quant.grid.QuantizedWeight`, not copies) and dequantizes its
weight inside ``forward``, one linear at a time.  The weight it multiplies by
is exactly ``QuantizedWeight.dequantize(dtype)``, the weight a materialised
copy holds, so both give the same logits.

Memory: at 4 bits the variant adds an eighth of the linears' fp32 bytes (a
quarter of bf16) plus scales, against a whole second model for a deep copy.
Cost: every forward unpacks and dequantizes each linear once.

``state_dict()`` of a variant looks like the dense model's (each
``QuantizedLinear`` writes its dequantized ``weight``), so code that saves or
exports a model reads it unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from engine.core.architectures import Architecture, get_submodule
from engine.core.sharing import shell_copy
from engine.quant.ggml_activations import as_llamacpp_input
from engine.quant.ggml_weight import GgmlWeight
from engine.quant.grid import QuantizedWeight


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is held quantized: ``x @ dequantize(weight).T + bias``.

    ``stored``: packed codes (``[out, packed row bytes]`` uint8), scales / zeros fp16 ``[out, groups]``.  The weight
    is dequantized in fp32 and cast to ``weight_dtype`` (the base linear's dtype), as a
    materialised copy holds it.  ``bias`` is the base model's tensor (shared).  Scales and
    zero points are registered as int16 bit patterns so ``model.to(dtype)`` cannot round them.
    """

    def __init__(self, stored: QuantizedWeight, bias: torch.Tensor | None, weight_dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.bits, self.group_size, self.zero_point = stored.bits, stored.group_size, stored.zero_point
        self.method, self.weight_dtype = stored.method, weight_dtype
        self.register_buffer("packed", stored.packed.to(device))
        self.register_buffer("scales_bits", stored.scales.view(torch.int16).to(device))
        self.register_buffer("zeros_bits", stored.zeros.view(torch.int16).to(device))
        self.register_buffer("g_idx", None if stored.g_idx is None else stored.g_idx.to(device))
        self.bias = bias

    def stored(self) -> QuantizedWeight:
        """The quantized weight this layer holds (its own tensors, no copy)."""
        return QuantizedWeight(scales=self.scales_bits.view(torch.float16), zeros=self.zeros_bits.view(torch.float16),
                               bits=self.bits, group_size=self.group_size, method=self.method, g_idx=self.g_idx,
                               zero_point=self.zero_point, packed=self.packed, in_features=self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized ``[out, in]`` weight, built on each access (not a parameter)."""
        return self.stored().dequantize(self.weight_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def held_bytes(self) -> int:
        """Bytes this layer holds for its weight (packed codes, scales, zeros, group index)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales_bits, self.zeros_bits, self.g_idx)
                   if t is not None)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, " \
               f"group_size={self.group_size}"


class GgmlLinear(nn.Module):
    """A linear layer whose weight is held as llama.cpp blocks (:class:`~engine.quant.ggml_weight.GgmlWeight`):
    ``x' @ to_float(blocks).T + bias``, dequantized by llama.cpp's own code in every forward, with ``x'`` the
    input quantized as llama.cpp's CPU matmul quantizes it (:mod:`engine.quant.ggml_activations`)."""

    def __init__(self, stored: GgmlWeight, bias: torch.Tensor | None, weight_dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.held, self.weight_dtype, self.device_ = stored, weight_dtype, device
        self.register_buffer("blocks", stored.blocks)  # CPU: llama.cpp's dequantizer reads it there
        self.bias = bias

    def stored(self) -> GgmlWeight:
        return self.held

    @property
    def weight(self) -> torch.Tensor:
        return self.held.dequantize(self.weight_dtype).to(self.device_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(as_llamacpp_input(x, self.held.qtype), self.weight, self.bias)

    def held_bytes(self) -> int:
        return self.held.nbytes_in_memory()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, type={self.held.choice.label()}"


def can_hold_codes(model: nn.Module, arch: Architecture) -> bool:
    """Whether every decoder linear of ``model`` is a plain ``nn.Linear`` (fused experts and GPT-2's
    Conv1D get a materialised copy instead)."""
    return all(type(linear) is nn.Linear
               for layer in arch.decoder_layers(model) for linear in arch.layer_linears(layer).values())


def quantized_variant(base: nn.Module, arch: Architecture, weights: list[dict[str, QuantizedWeight]]) -> nn.Module:
    """A variant of ``base`` whose layer ``i`` linears are :class:`QuantizedLinear` of ``weights[i]``.

    Shares every other tensor with ``base``, which is never modified.  Requires :func:`can_hold_codes`.
    """
    variant = shell_copy(base)
    for layer, layer_weights in zip(arch.decoder_layers(variant), weights):
        for short, stored in layer_weights.items():
            parent_path, _, name = arch.linears[short].rpartition(".")
            parent = get_submodule(layer, parent_path) if parent_path else layer
            linear = getattr(parent, name)
            kind = GgmlLinear if isinstance(stored, GgmlWeight) else QuantizedLinear
            setattr(parent, name, kind(stored, linear.bias, linear.weight.dtype, linear.weight.device))
    return variant.eval()


def held_code_bytes(model: nn.Module) -> int:
    """Bytes held by the :class:`QuantizedLinear` layers of ``model`` (0 for a materialised model)."""
    return sum(m.held_bytes() for m in model.modules() if isinstance(m, (QuantizedLinear, GgmlLinear)))
