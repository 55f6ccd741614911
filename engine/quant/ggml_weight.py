"""A linear weight held in one of llama.cpp's tensor types: the very bytes a GGUF file stores.

:func:`ggml_quantize` runs llama.cpp's own quantizer (``ggml_quantize_chunk``,
optionally weighted by an importance vector, as ``llama-quantize --imatrix``
does); :meth:`GgmlWeight.dequantize` runs llama.cpp's own ``to_float`` on the
same bytes.  The weight the in-app model multiplies by is therefore exactly
the weight llama.cpp reads from the exported file.

:class:`GgmlWeight` offers the interface of
:class:`~engine.quant.grid.QuantizedWeight` that the rest of the engine uses
(``shape``, ``bits``, ``method``, ``dequantize``, ``storage_bits``,
``bits_per_weight``, ``nbytes_in_memory``, ``to``).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from engine.core.architectures import get_submodule
from engine.llamacpp import ggml
from engine.quant.ggml_activations import as_llamacpp_input
from engine.quant.ggml_types import TypeChoice, output_type, type_for_level

METHOD = "llama.cpp"


class GgmlWeight:
    """``blocks``: uint8 ``[out, row_bytes]`` of type ``qtype`` (``wanted``: the type the level asked for,
    before llama.cpp's fallback); ``in_features``: weights per row; ``bits``: the level it stands for."""

    method = METHOD
    g_idx = None

    def __init__(self, blocks: torch.Tensor, qtype: str, in_features: int, bits: int, wanted: str | None = None,
                 imatrix: bool = False) -> None:
        self.blocks, self.qtype, self.in_features, self.bits = blocks, qtype, int(in_features), int(bits)
        self.wanted, self.imatrix = wanted or qtype, imatrix

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.blocks.shape[0]), self.in_features

    @property
    def choice(self) -> TypeChoice:
        return TypeChoice(self.wanted, self.qtype)

    def to(self, device: torch.device | str) -> GgmlWeight:
        """Blocks live on the CPU (llama.cpp's dequantizer reads them there); ``self``."""
        return self

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """llama.cpp's ``to_float`` of the blocks: ``[out, in]`` float32, cast to ``dtype``."""
        if self.qtype in ("F16", "F32"):
            values = self.blocks.view(torch.float16 if self.qtype == "F16" else torch.float32).float()
            return values.reshape(self.shape).to(dtype)
        return torch.from_numpy(ggml.dequantize(self.blocks.numpy(), self.qtype, self.in_features)).to(dtype)

    def storage_bits(self) -> int:
        return self.blocks.numel() * 8

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])

    def nbytes_in_memory(self) -> int:
        return self.blocks.numel()

    def config(self) -> dict:
        return {"format": "ggml", "qtype": self.qtype, "wanted": self.wanted, "shape": list(self.shape),
                "bits": self.bits, "method": METHOD, "imatrix": self.imatrix}


def ggml_quantize(weight: torch.Tensor, level: int, type_set: str = "k-quants",
                  importance: torch.Tensor | None = None) -> GgmlWeight:
    """llama.cpp's quantization of ``weight [out, in]`` at ``level`` (the type set's type, with llama.cpp's
    fallback for the row length); ``importance [in]``: mean squared input per column (imatrix) or ``None``."""
    out, inp = weight.shape
    choice = type_for_level(level, int(inp), type_set)
    values = weight.detach().float().cpu().numpy()
    if choice.qtype in ("F16", "F32"):
        stored = values.astype(np.float16 if choice.qtype == "F16" else np.float32)
        blocks = torch.from_numpy(stored.view(np.uint8).reshape(out, -1).copy())
    else:
        imatrix = None if importance is None else importance.detach().float().cpu().numpy()
        blocks = torch.from_numpy(ggml.quantize(values, choice.qtype, imatrix))
    return GgmlWeight(blocks, choice.qtype, inp, level, choice.wanted, imatrix=importance is not None)


def output_weight(weight: torch.Tensor, requested: str = "auto") -> GgmlWeight:
    """The output matrix (or a tied embedding) ``[vocab, hidden]`` in llama.cpp's output type (its rule for
    ``auto``: Q6_K, Q8_0 when rows are not a multiple of 256)."""
    rows, n = weight.shape
    choice = output_type(int(n), requested)
    values = weight.detach().float().cpu().numpy()
    if choice.qtype == "F16":
        blocks = torch.from_numpy(values.astype(np.float16).view(np.uint8).reshape(rows, -1).copy())
    else:
        blocks = torch.from_numpy(ggml.quantize(values, choice.qtype))
    return GgmlWeight(blocks, choice.qtype, int(n), 16, choice.wanted)


@torch.no_grad()
def with_output_type(model: nn.Module, loaded, spec) -> nn.Module:
    """``model`` (a variant: its own module tree) with its embedding and head holding llama.cpp's
    dequantization of their output type (``spec.output_type``), as the GGUF file will hold them.

    A tied head stays tied, and its input is quantized as llama.cpp quantizes it for that type
    (:func:`~engine.quant.ggml_activations.as_llamacpp_input`).  The base model's tensors and modules are not
    touched: the variant gets new ones.
    """
    arch = loaded.architecture
    embedding = get_submodule(model, arch.embedding)
    head = get_submodule(model, arch.head)
    tied = head.weight is embedding.weight
    for module in (embedding,) if tied else (embedding, head):
        stored = output_weight(module.weight, spec.output_type)
        module.weight = nn.Parameter(stored.dequantize(module.weight.dtype).to(module.weight.device),
                                     requires_grad=False)
        if module is head or tied:
            qtype = stored.qtype
            head.register_forward_pre_hook(lambda _module, args: (as_llamacpp_input(args[0], qtype), *args[1:]))
    if tied:
        head.weight = embedding.weight
    return model


_FORWARD_COST: dict[tuple, float] = {}
_TIMED_TOKENS = 128


def extra_forward_seconds(weight: torch.Tensor, level: int, tokens: int, type_set: str = "k-quants") -> float:
    """Seconds a :class:`GgmlLinear` of ``weight [out, in]`` at ``level`` spends per forward over ``tokens``
    tokens beyond a float ``nn.Linear`` (llama.cpp's dequantizer runs on every forward, on the CPU, and the input
    is rounded as llama.cpp's CPU backend rounds it): measured once per shape, llama.cpp type and device on
    128 tokens, scaled to ``tokens`` (time estimates)."""
    qtype = type_for_level(level, int(weight.shape[1]), type_set).qtype
    key = (*weight.shape, qtype, str(weight.device))
    if key not in _FORWARD_COST:
        stored = ggml_quantize(weight, level, type_set)
        x = torch.randn(1, _TIMED_TOKENS, weight.shape[1], device=weight.device, dtype=weight.dtype)

        def timed(run) -> float:
            start = time.perf_counter()
            run()
            if weight.device.type == "cuda":
                torch.cuda.synchronize(weight.device)
            return time.perf_counter() - start

        plain, held = [], []
        with torch.no_grad():
            for _ in range(3):  # the fastest of three: the first pays for warming up
                plain.append(timed(lambda: nn.functional.linear(x, weight)))
                held.append(timed(lambda: nn.functional.linear(
                    as_llamacpp_input(x, stored.qtype), stored.dequantize(weight.dtype).to(weight.device))))
        _FORWARD_COST[key] = max(0.0, min(held) - min(plain)) / _TIMED_TOKENS
    return _FORWARD_COST[key] * tokens


def extra_model_forward_seconds(model: nn.Module, arch, level: int, tokens: int, type_set: str = "k-quants") -> float:
    """:func:`extra_forward_seconds` of every decoder linear of ``model`` in llama.cpp's types at ``level``, per
    forward over ``tokens`` tokens (the first layer's linears measured, times the layer count); 0 for models whose
    linears are not all ``nn.Linear`` (fused experts, Conv1D: they are materialised, not dequantized per forward)
    and where llama.cpp is not built (nothing of llama.cpp's types runs there)."""
    from engine.llamacpp.runtime import status
    from engine.quant.quantized_linear import can_hold_codes

    if not status().available or not can_hold_codes(model, arch):
        return 0.0
    layers = arch.decoder_layers(model)
    linears = list(arch.layer_linears(layers[0]).values())
    try:
        return len(layers) * sum(extra_forward_seconds(linear.weight, level, tokens, type_set) for linear in linears)
    except ValueError:  # a level or type set llama.cpp lacks: the run itself refuses it, saying what to choose
        return 0.0
