"""GPTQ (Frantar et al. 2022) as pure tensor math: Hessian accumulation, preparation, the column loop.

No model wiring here: ``engine.quant.quantize_model`` feeds each linear's
calibration inputs.  The grid (scales, zeros, codes) is the one of
``engine.quant.grid``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.core.cpu import single_cpu_thread
from engine.quant.grid import (
    QuantizationError,
    QuantizedWeight,
    QuantizerSpec,
    effective_group_size,
    grid_params,
    rtn_quantize,
)


class HessianAccumulator:
    """Running ``H = 2/n · Σ x xᵀ`` (fp32, ``[in, in]``) over calibration inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs ``[..., in]`` (every leading position is one token)."""
        x = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        self.sum.addmm_(x.t(), x)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.count == 0:
            raise QuantizationError("GPTQ saw no calibration tokens for a linear; give it calibration windows.")
        return self.sum * (2.0 / self.count)


@dataclass
class PreparedHessian:
    """Upper Cholesky factor of the damped inverse Hessian, in processing order."""

    hinv: torch.Tensor
    perm: torch.Tensor | None


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """Dead inputs (zero diagonal) get 1, activation order permutes, damping, Cholesky inverse.

    Retries with 10× more damping (up to 3 times) if the matrix is not positive definite.
    """
    h = hessian.detach().float().clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0  # weights of never-active inputs are kept and rounded like RTN
    perm = torch.argsort(diag, descending=True) if act_order else None
    if perm is not None:
        h = h[perm][:, perm]
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    mean_diag = float(torch.diagonal(h).mean())
    for attempt in range(4):
        damped = h + eye * (damp * 10**attempt * mean_diag)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return PreparedHessian(hinv=upper, perm=perm)
    raise QuantizationError("The calibration Hessian is not positive definite even with heavy damping; "
                            "use more calibration windows or a larger damping.")


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, spec: QuantizerSpec,
                  block_size: int = 128) -> QuantizedWeight:
    """GPTQ of ``weight [out, in]`` given its inputs' Hessian ``[in, in]`` (or a prepared one).

    The same grid as :func:`rtn_quantize`; errors are compensated on the columns
    still to be quantized.  ``block_size`` is rounded to a multiple of the
    group size so that each group's parameters are taken from fully updated
    weights.
    """
    if weight.dim() != 2:
        raise QuantizationError(f"Expected a 2-D linear weight, got shape {tuple(weight.shape)}.")
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, spec.damp, spec.act_order)
    out, inp = weight.shape
    if prepared.hinv.shape != (inp, inp):
        raise QuantizationError(f"Hessian {tuple(prepared.hinv.shape)} does not match weight {tuple(weight.shape)}.")
    gs = effective_group_size(inp, spec.group_size)
    groups = math.ceil(inp / gs)
    block = gs * max(1, block_size // gs)
    w = weight.detach().float().to(prepared.hinv.device)
    if prepared.perm is not None:
        w = w[:, prepared.perm]
    wt = w.t().contiguous()  # [in, out]: one input column per contiguous row, fast on CPU
    hinv = prepared.hinv
    codes = torch.zeros_like(wt)
    scales = torch.empty(groups, out, dtype=torch.float16, device=w.device)
    zeros = torch.empty_like(scales)
    maxq = 2**spec.bits - 1
    integer_zero = spec.zero_point == "integer"
    with single_cpu_thread(w.device):
        for i1 in range(0, inp, block):
            i2 = min(i1 + block, inp)
            w1 = wt[i1:i2].clone()
            err1 = torch.zeros_like(w1)
            h1 = hinv[i1:i2, i1:i2]
            diag = torch.diagonal(h1).tolist()
            for i in range(i2 - i1):
                col = i1 + i
                if col % gs == 0:
                    g = col // gs
                    scales[g], zeros[g] = grid_params(w1[i : i + gs].t(), spec.bits, spec.zero_point)
                    scale, zero = scales[g].float(), zeros[g].float()
                x, q, err = w1[i], codes[col], err1[i]
                if integer_zero:  # q = clamp(round(x / scale + zero)); err = (x - (q - zero) * scale) / d
                    torch.div(x, scale, out=q).add_(zero).round_().clamp_(0, maxq)
                    torch.addcmul(x, q - zero, scale, value=-1.0, out=err).div_(diag[i])
                else:  # q = clamp(round((x - zero) / scale)); err = (x - (q * scale + zero)) / d
                    torch.sub(x, zero, out=q).div_(scale).round_().clamp_(0, maxq)
                    torch.sub(x, q * scale + zero, out=err).div_(diag[i])
                w1[i:].addr_(h1[i, i:], err, alpha=-1.0)
            wt[i2:].addmm_(hinv[i1:i2, i2:].t(), err1, alpha=-1.0)
    codes = codes.t()
    scales, zeros = scales.t().contiguous(), zeros.t().contiguous()
    g_idx = None
    if prepared.perm is not None:
        inverse = torch.argsort(prepared.perm)
        codes = codes[:, inverse]
        if groups > 1:
            g_idx = (inverse // gs).to(torch.int32)
    return QuantizedWeight(codes=codes.to(torch.uint8).contiguous(), scales=scales, zeros=zeros,
                           bits=spec.bits, group_size=gs, method="gptq", g_idx=g_idx, zero_point=spec.zero_point)


def quantize_weight(weight: torch.Tensor, spec: QuantizerSpec,
                    hessian: torch.Tensor | PreparedHessian | None = None) -> QuantizedWeight:
    """Dispatch on ``spec.method``; GPTQ needs the inputs' Hessian."""
    if spec.method == "rtn":
        return rtn_quantize(weight, spec)
    if hessian is None:
        raise QuantizationError("GPTQ needs calibration data (a Hessian of the layer inputs).")
    return gptq_quantize(weight, hessian, spec)
