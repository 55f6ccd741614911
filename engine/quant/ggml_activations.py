"""The activations llama.cpp's CPU matrix multiply actually uses: quantized to the weight type's dot-product
partner before every quantized matmul.

llama.cpp never multiplies a quantized weight by float activations: each weight type has a ``vec_dot_type``
(``type_traits_cpu`` in ``ggml-cpu/ggml-cpu.c``) and the input row is first converted to it, in blocks along
the input dimension:

- Q4_0, Q5_0, Q8_0, IQ4_NL -> **Q8_0**: blocks of 32, ``d = amax / 127`` stored as fp16,
  ``q = round_half_even(x * 127 / amax)`` (x86 ``quantize_row_q8_0``); Q4_1, Q5_1 -> **Q8_1** (the same codes and
  scale, plus a block sum the dot product uses for the weights' minimum);
- Q2_K ... Q6_K, IQ4_XS -> **Q8_K**: blocks of 256, the signed value of largest magnitude ``m``,
  ``q = min(127, round_half_even(x * -127 / m))``, ``d = -m / 127`` in fp32 (``quantize_row_q8_K_ref``);
- F16 -> the activations rounded to fp16; BF16 -> bfloat16; F32 -> unchanged.

The integer dot product equals the dot product of the two dequantized rows, so multiplying the dequantized
weight by :func:`as_llamacpp_input` reproduces llama.cpp's arithmetic up to float summation order.  Without
it an in-app model of llama.cpp types differs from llama.cpp by ~0.5% perplexity on the built-in models; with
it, see ``bench/llamacpp_agreement.py``.  Shapes: ``x [..., n]`` with ``n`` a multiple of the block.
"""

from __future__ import annotations

import torch

VEC_DOT_TYPE = {
    "Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "IQ4_NL": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
    "Q2_K": "Q8_K", "Q3_K": "Q8_K", "Q4_K": "Q8_K", "Q5_K": "Q8_K", "Q6_K": "Q8_K", "IQ4_XS": "Q8_K",
    "F16": "F16", "BF16": "BF16", "F32": "F32",
}
"""Weight type -> the type llama.cpp's CPU backend converts the activations to before the dot product."""


def _divide(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """``numerator / denominator`` as C divides (``scalar / tensor`` in torch multiplies by a reciprocal,
    one rounding more); 0 where the denominator is 0."""
    nonzero = denominator != 0
    quotient = torch.div(torch.full_like(denominator, numerator), torch.where(nonzero, denominator, 1.0))
    return torch.where(nonzero, quotient, torch.zeros_like(quotient))


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 / Q8_1 of ``blocks [..., 32]`` float32, dequantized."""
    amax = blocks.abs().amax(-1, keepdim=True)
    d = torch.div(amax, torch.full_like(amax, 127.0)).to(torch.float16).float()
    return torch.round(blocks * _divide(127.0, amax)) * d


def _q8_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_K of ``blocks [..., 256]`` float32, dequantized."""
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))  # the first of equal magnitudes
    iscale = _divide(-127.0, signed_max)
    return torch.round(blocks * iscale).clamp(max=127.0) * _divide(1.0, iscale)


def as_llamacpp_input(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x [..., n]`` as llama.cpp's CPU backend sees it when multiplying by a weight of ``weight_type``
    (same shape and dtype)."""
    kind = VEC_DOT_TYPE.get(weight_type, "F32")
    if kind == "F32":
        return x
    if kind in ("F16", "BF16"):
        return x.to(torch.float16 if kind == "F16" else torch.bfloat16).to(x.dtype)
    block = 256 if kind == "Q8_K" else 32
    n = x.shape[-1]
    if n % block:
        raise ValueError(f"{weight_type} rows of {n} values are not whole {kind} blocks of {block}.")
    blocks = x.float().reshape(*x.shape[:-1], n // block, block)
    out = _q8_k(blocks) if kind == "Q8_K" else _q8_0(blocks)
    return out.reshape(x.shape).to(x.dtype)
