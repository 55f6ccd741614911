"""GPTQ (Frantar et al. 2022) as pure tensor math: Hessian accumulation, preparation, the column loop.

No model wiring here: ``engine.quant.quantize_model`` feeds each linear's
calibration inputs.  The grid (scales, zeros, codes) is the one of
``engine.quant.grid``.

For a linear ``y = W x`` with calibration inputs ``X`` (one row per token),
GPTQ minimises ``||(W - Ŵ) Xᵀ||²`` column by column: column ``i`` is rounded
to the grid, and its error, divided by ``[H⁻¹]_ii``, is spread over the
columns not yet quantized through row ``i`` of ``H⁻¹`` (restricted to them),
with ``H = 2/n · Σ x xᵀ``.  The restricted inverses of all steps are the rows
of ``U``, the upper Cholesky factor of ``H⁻¹``; everything runs in
processing order (by decreasing ``diag(H)`` with act-order).

Numerics (choices, each matching or tightening the reference implementations):
- ``H`` is summed in fp64 (each batch's ``XᵀX`` is an fp32 product); the
  factorization runs in fp32, in fp64 when fp32 fails (see
  :func:`prepare_hessian` for the measured difference); the column loop
  runs in fp32 by default (fp64 on request).
- Dead inputs (``H_ii = 0``: never active in calibration) get ``H_ii = 1``
  and are uncoupled from the others, so their weights are simply rounded
  (the references set them to zero; rounding keeps them useful if the input
  is active on other text).
- Damping: ``damp · mean(diag H)`` is added to the diagonal (after the dead
  fix); if ``H`` is still not positive definite, 10× more, up to 3 times.
- The scale of ``H`` (``2/n``) does not change the result.

The loop is blocked twice (the "lazy batch" updates of the paper): per
column, only the rest of a ``sub_block`` is updated (a rank-1 update); at the
end of a sub-block the rest of its ``block`` gets one matrix product, and at
the end of a block all later columns do.  Weights that read the same input
(q/k/v; gate/up; several bit widths of one linear) are stacked along the
output dimension and go through one loop: rows are independent in GPTQ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.core.cpu import single_cpu_thread
from engine.quant.grid import (
    QuantizationError,
    QuantizedWeight,
    QuantizerSpec,
    apply_grid,
    effective_group_size,
    grid_params,
    quantize_to_grid,
    rtn_quantize,
)

GRAM_PARTS, MIN_GRAM_SPLIT = 4, 256  # Hessian products: row blocks, and the narrowest input worth splitting
BLOCK = 128  # columns per lazy-batch block
SUB_BLOCK = 16  # columns per rank-1-updated sub-block inside a block
DAMPING_RETRIES = 3


def gram(x: torch.Tensor, parts: int = GRAM_PARTS) -> torch.Tensor:
    """``xᵀ x`` ``[n, n]`` for ``x [tokens, n]``, computing only the blocks on and right of the diagonal.

    Row block ``k`` of ``parts`` is one product against the columns from its
    own start on; the blocks below the diagonal are their transposes.  With
    4 parts that is 62.5% of the multiply-adds of ``x.T @ x`` (about 30% less
    time on one CPU thread for the built-in model's widths).
    """
    n = x.shape[1]
    if n < MIN_GRAM_SPLIT:
        return x.t() @ x
    edges = [n * k // parts for k in range(parts + 1)]
    out = x.new_empty(n, n)
    for start, end in zip(edges[:-1], edges[1:]):
        rows = x[:, start:end].t() @ x[:, start:]  # [end - start, n - start]
        out[start:end, start:] = rows
        out[end:, start:end] = rows[:, end - start :].t()
    return out


class HessianAccumulator:
    """Running ``H = 2/n · Σ x xᵀ`` (``[in, in]``, summed in fp64) over calibration inputs."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, inputs: torch.Tensor) -> None:
        """Add inputs ``[..., in]`` (every leading position is one token); the product is taken in fp32."""
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        x = x if x.dtype == torch.float64 else x.float()
        self.sum += gram(x).to(self.sum.device, torch.float64)
        self.count += x.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2/n · Σ x xᵀ``, fp64 ``[in, in]``."""
        if self.count == 0:
            raise QuantizationError("GPTQ saw no calibration tokens for a linear; give it calibration windows.")
        return self.sum * (2.0 / self.count)


@dataclass
class PreparedHessian:
    """A Hessian ready for the column loop.

    ``hinv``: ``U``, the upper Cholesky factor of the damped ``H⁻¹`` in
    processing order, fp64 ``[in, in]``; ``perm``: processing order
    (``perm[j]`` = original column processed ``j``-th), ``None`` without act-order.
    """

    hinv: torch.Tensor
    perm: torch.Tensor | None


def prepare_hessian(hessian: torch.Tensor, damp: float = 0.01, act_order: bool = False) -> PreparedHessian:
    """Dead inputs get ``H_ii = 1``, act-order permutes, damping, then ``U = chol(H⁻¹)ᵀ`` (fp64 result).

    The factorization runs in fp32 and falls back to fp64 when fp32 finds
    the damped matrix not positive definite; only then is the damping raised
    (10×, up to 3 times).  On the built-in model's Hessians (damped condition
    numbers 5e3-5e4) fp32 and fp64 factors differ by < 1e-4 relative and
    change < 0.05% of the codes.  Runs on one CPU thread (LAPACK on a busy
    2-core machine is 10-50× slower with two).
    """
    with single_cpu_thread(hessian.device):
        h = hessian.detach().to(torch.float64)
        diag = torch.diagonal(h).clone()
        diag[diag == 0] = 1.0  # dead inputs: their row and column are zero, so they stay uncoupled
        perm = torch.argsort(diag, descending=True, stable=True) if act_order else None
        if perm is not None:
            h, diag = h[perm][:, perm], diag[perm]
        for attempt in range(DAMPING_RETRIES + 1):
            damped_diag = diag + damp * 10**attempt * float(diag.mean())
            for dtype in (torch.float32, torch.float64):
                damped = h.to(dtype, copy=True)
                damped.diagonal().copy_(damped_diag)
                upper = _inverse_cholesky(damped)
                if upper is not None:
                    return PreparedHessian(hinv=upper.to(torch.float64), perm=perm)
    raise QuantizationError("The calibration Hessian is not positive definite even with heavy damping; "
                            "use more calibration windows or a larger damping.")


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of ``h⁻¹`` (``h`` symmetric), or ``None`` if ``h`` is not positive definite."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) != 0:
        return None
    upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return upper if int(info) == 0 else None


# --- the column loop ------------------------------------------------------------


@dataclass
class _Grid:
    """Grid of the stacked rows during the loop (all ``[in, rows]`` tensors are in processing order).

    ``bits``: the code width, or widths per row ``[rows]`` when rows of
    several widths are stacked; ``segments``: ``(start, end, bits)`` row
    ranges of one width.  ``group_scales`` / ``group_zeros``: fp16
    ``[groups, rows]``, the stored parameters.  Static: fixed before the
    loop, and ``scale`` / ``zero`` hold them per processed column
    ``[in, rows]``.  Dynamic: filled group by group as the loop reaches
    them, ``scale`` / ``zero`` holding the current group's ``[rows]``.
    """

    bits: int | torch.Tensor
    segments: list[tuple[int, int, int]]
    zero_point: str
    group_size: int
    static: bool
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None
    group_scales: torch.Tensor | None = None
    group_zeros: torch.Tensor | None = None

    def start_group(self, weights: torch.Tensor, group: int) -> None:
        """Dynamic groups: parameters of ``group`` from the (updated) columns ``weights [gs, rows]``."""
        for start, end, bits in self.segments:
            scale, zero = grid_params(weights[:, start:end].t(), bits, self.zero_point)
            self.group_scales[group, start:end], self.group_zeros[group, start:end] = scale, zero
        self.scale = self.group_scales[group].to(weights.dtype)
        self.zero = self.group_zeros[group].to(weights.dtype)

    def column(self, col: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero ``[rows]`` of processed column ``col``."""
        if self.static:
            return self.scale[col], self.zero[col]
        return self.scale, self.zero


def _boundaries(i1: int, i2: int, sub_block: int, grid: _Grid) -> list[int]:
    """Sub-block starts in ``[i1, i2)``, plus every dynamic group start (its columns must be fully updated)."""
    starts = set(range(i1, i2, sub_block))
    if not grid.static:
        starts |= set(range(math.ceil(i1 / grid.group_size) * grid.group_size, i2, grid.group_size))
    return sorted(starts) + [i2]


def _column_loop(wt: torch.Tensor, g: torch.Tensor, grid: _Grid, block: int, sub_block: int) -> torch.Tensor:
    """GPTQ over the columns of ``wt [in, rows]`` (processing order, updated in place); codes ``[in, rows]``.

    ``g``: ``U`` with row ``i`` divided by ``U_ii`` (``[in, in]``, ``wt``'s
    dtype), so an unscaled error ``e = w - ŵ`` of column ``i`` updates the
    later columns by ``-g[i, j] · e``.
    """
    n = wt.shape[0]
    codes = torch.empty_like(wt)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1, g1 = wt[i1:i2], g[i1:i2, i1:i2]
        errors = torch.empty_like(w1)
        bounds = _boundaries(i1, i2, sub_block, grid)
        for j1, j2 in zip(bounds[:-1], bounds[1:]):
            for col in range(j1, j2):
                i = col - i1
                if not grid.static and col % grid.group_size == 0:
                    grid.start_group(w1[i : i + grid.group_size], col // grid.group_size)
                scale, zero = grid.column(col)
                x = w1[i]
                q = quantize_to_grid(x, scale, zero, grid.bits, grid.zero_point)
                codes[col] = q
                err = torch.sub(x, apply_grid(q, scale, zero, grid.zero_point), out=errors[i])  # q: now ŵ
                w1[i + 1 : j2 - i1].addr_(g1[i, i + 1 : j2 - i1], err, alpha=-1.0)
            a, b = j1 - i1, j2 - i1
            w1[b:].addmm_(g1[a:b, b:].t(), errors[a:b], alpha=-1.0)
        wt[i2:].addmm_(g[i1:i2, i2:].t(), errors, alpha=-1.0)
    return codes


def _check_shared(weights: Sequence[torch.Tensor], specs: Sequence[QuantizerSpec]) -> None:
    if len(weights) != len(specs) or not weights:
        raise QuantizationError("Give one quantizer spec per weight.")
    inp = weights[0].shape[1] if weights[0].dim() == 2 else None
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != inp:
            raise QuantizationError(f"Expected 2-D linear weights with {inp} inputs, got {tuple(weight.shape)}.")
    first = specs[0]
    if any((s.group_size, s.grid, s.act_order, s.group_params) !=
           (first.group_size, first.grid, first.act_order, first.group_params) for s in specs):
        raise QuantizationError("Weights quantized together may differ in bits only.")


def gptq_quantize_shared(
    weights: Sequence[torch.Tensor],
    hessian: torch.Tensor | PreparedHessian,
    specs: Sequence[QuantizerSpec],
    *,
    block_size: int = BLOCK,
    sub_block: int = SUB_BLOCK,
    dtype: torch.dtype = torch.float32,
) -> list[QuantizedWeight]:
    """GPTQ of several weights ``[out_k, in]`` that read the same input (one Hessian ``[in, in]``).

    ``specs[k]`` quantizes ``weights[k]``; they may differ in ``bits`` only.
    The rows of all weights go through one column loop (exactly the same
    result as one loop per weight, up to float summation order).  ``dtype``:
    precision of the loop (the Hessian factor is always computed in fp64).
    Results are on the Hessian's device.
    """
    _check_shared(weights, specs)
    spec = specs[0]
    prepared = hessian if isinstance(hessian, PreparedHessian) else prepare_hessian(hessian, spec.damp, spec.act_order)
    inp = weights[0].shape[1]
    if prepared.hinv.shape != (inp, inp):
        raise QuantizationError(f"Hessian {tuple(prepared.hinv.shape)} does not match {inp} weight inputs.")
    device = prepared.hinv.device
    gs = effective_group_size(inp, spec.group_size)
    block = gs * max(1, block_size // gs)  # a dynamic group never straddles two blocks
    with single_cpu_thread(device):  # thousands of small ops: one thread is faster on a shared CPU
        grid = _make_grid(weights, specs, gs, device, dtype, prepared.perm)
        wt = torch.cat([weight.detach().to(device, dtype) for weight in weights]).t()  # [in, rows]
        if prepared.perm is not None:
            wt = wt[prepared.perm]
        u = prepared.hinv
        g = (u / torch.diagonal(u)[:, None]).to(dtype)
        codes = _column_loop(wt.contiguous(), g, grid, block, sub_block).t()
        return _split(codes, grid, weights, specs, gs, prepared.perm)


def _make_grid(weights, specs, gs: int, device, dtype, perm: torch.Tensor | None) -> _Grid:
    """The loop's grid: static per-column parameters (the RTN grid of the original weights) or empty groups."""
    rows = [weight.shape[0] for weight in weights]
    bounds = [0, *torch.tensor(rows).cumsum(0).tolist()]
    segments = [(bounds[k], bounds[k + 1], s.bits) for k, s in enumerate(specs)]
    widths = {s.bits for s in specs}
    bits = widths.pop() if len(widths) == 1 else torch.cat(
        [torch.full((r,), s.bits, dtype=dtype, device=device) for r, s in zip(rows, specs)])
    spec = specs[0]
    if spec.group_params == "dynamic":
        groups = math.ceil(weights[0].shape[1] / gs)
        empty = torch.empty(groups, sum(rows), dtype=torch.float16, device=device)
        return _Grid(bits, segments, spec.grid, gs, static=False, group_scales=empty,
                     group_zeros=torch.empty_like(empty))
    rtn = [rtn_quantize(weight.detach().to(device), s) for weight, s in zip(weights, specs)]
    group_scales = torch.cat([q.scales for q in rtn]).t().contiguous()  # [groups, rows] fp16
    group_zeros = torch.cat([q.zeros for q in rtn]).t().contiguous()
    column_group = torch.arange(weights[0].shape[1], device=device) // gs
    if perm is not None:
        column_group = column_group[perm]
    return _Grid(bits, segments, spec.grid, gs, static=True, scale=group_scales.to(dtype)[column_group],
                 zero=group_zeros.to(dtype)[column_group], group_scales=group_scales, group_zeros=group_zeros)


def _split(codes: torch.Tensor, grid: _Grid, weights, specs, gs: int,
           perm: torch.Tensor | None) -> list[QuantizedWeight]:
    """Per-weight :class:`QuantizedWeight` from the stacked codes ``[rows, in]`` (processing order)."""
    g_idx = None
    if perm is not None:
        inverse = torch.argsort(perm)
        codes = codes[:, inverse]
        if not grid.static and grid.group_scales.shape[0] > 1:
            g_idx = (inverse // gs).to(torch.int32)  # dynamic groups follow the processing order
    scales, zeros = grid.group_scales.t(), grid.group_zeros.t()  # [rows, groups]
    out = []
    for (start, end, bits), spec in zip(grid.segments, specs):
        out.append(QuantizedWeight(codes=codes[start:end].to(torch.uint8).contiguous(),
                                   scales=scales[start:end].contiguous(), zeros=zeros[start:end].contiguous(),
                                   bits=bits, group_size=gs, method="gptq", g_idx=g_idx, zero_point=spec.grid))
    return out


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, spec: QuantizerSpec,
                  block_size: int = BLOCK) -> QuantizedWeight:
    """GPTQ of ``weight [out, in]`` given its inputs' Hessian ``[in, in]`` (or a prepared one)."""
    if weight.dim() != 2:
        raise QuantizationError(f"Expected a 2-D linear weight, got shape {tuple(weight.shape)}.")
    return gptq_quantize_shared([weight], hessian, [spec], block_size=block_size)[0]


def quantize_weight(weight: torch.Tensor, spec: QuantizerSpec,
                    hessian: torch.Tensor | PreparedHessian | None = None) -> QuantizedWeight:
    """Dispatch on ``spec.method``; GPTQ needs the inputs' Hessian."""
    if spec.method == "rtn":
        return rtn_quantize(weight, spec)
    if hessian is None:
        raise QuantizationError("GPTQ needs calibration data (a Hessian of the layer inputs).")
    return gptq_quantize(weight, hessian, spec)
