"""Weight quantizers: pure tensor math, no model wiring (docs/methods.md §4).

Two methods share one grid, group-wise along the input dimension; by
default asymmetric (as in GPTQ's reference quantizer):

- each group of ``group_size`` consecutive input columns of one output row has
  an fp16 ``scale`` and an integer-valued ``zero`` point (stored as fp16);
  ``range = [min(w, 0), max(w, 0)]``, ``scale = range / (2**bits - 1)`` rounded
  *up* to the next fp16 value, ``zero = round(-min / scale)``;
- ``code = clamp(round(w / scale + zero), 0, 2**bits - 1)`` and the weight used
  by the model is exactly ``dequantize = (code - zero) * scale`` (in fp32, then
  cast to the model's dtype).

Option ``zero_point="float"`` (the GGUF Q4_1 "scale + min" grid): the range
is ``[min(w), max(w)]``, ``zeros`` holds the fp16 minimum ``m`` (rounded down),
``code = clamp(round((w - m) / scale))`` and ``dequantize = code * scale + m``.
It reproduces an already Q4_1-quantized model exactly at 4 bits with group
32, which the integer grid cannot (its grid points are multiples of scale).

Option ``zero_point="symmetric"`` (GPTQ's ``sym=True``, compressed-tensors'
and GGUF Q4_0's grid): the zero is fixed at ``2**(bits-1)`` and not stored,
``scale = 2 * max|w| / (2**bits - 1)`` rounded up to fp16, and the integer
formulas above apply.  It is the grid that exports exactly as a
compressed-tensors folder (:mod:`engine.export.ct_folder`).

``rtn_quantize`` rounds every weight to its nearest grid point, so
``|w - dequantize| <= scale / 2``.  ``engine.quant.gptq`` (Frantar et al.
2022) uses the same grid but chooses the codes column by column, spreading
each column's rounding error over the columns still to be quantized.  Its
options live in :class:`QuantizerSpec`: activation ordering (``act_order``),
where group scales and zeros come from (``group_params``: ``static`` = from
the original weights, the RTN grid, no group index stored; ``dynamic`` = from
the already-updated weights when a group starts in processing order, which
with act-order needs a per-column group index ``g_idx``), and which signals
calibrate each layer (``propagation``).  When ``in_features`` is not a
multiple of ``group_size`` the last group is simply shorter.

Storage (bit-packed codes, safetensors) lives in :mod:`engine.quant.files`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from engine.quant.packing import pack_rows, unpack_rows

RTN = "rtn"  # round to nearest on LayerLab's grid (engine.quant.grid)
GPTQ = "gptq"  # GPTQ on the same grid (engine.quant.gptq)
LLAMACPP = "llama.cpp"  # llama.cpp's own types and quantizer (engine.quant.ggml_weight)
METHODS = (RTN, GPTQ, LLAMACPP)
ZERO_POINTS = ("integer", "float", "symmetric")
ZERO_POINT_LABELS = {"integer": ", integer zero", "float": ", float zero", "symmetric": ", symmetric"}
"""How labels and series name a grid (the integer one only where it is not the default)."""
GROUP_PARAMS = ("static", "dynamic")
PROPAGATIONS = ("sequential", "dense")
MIN_BITS, MAX_BITS = 2, 8
FP16_BITS = 16
GIDX_BITS = 32  # int32 group index per input column (act-order GPTQ only)


class QuantizationError(ValueError):
    """A quantization request is invalid or cannot be met; the message says what to do."""


@dataclass(frozen=True)
class QuantizerSpec:
    """How to quantize one linear weight.

    ``bits``: code width, 2-8.  ``group_size``: input columns sharing one scale
    and zero (``None`` = one group per output row).  ``zero_point``:
    ``integer`` (GPTQ convention), ``float`` (fp16 group minimum) or
    ``symmetric`` (zero fixed at ``2**(bits-1)``, not stored).  ``zero_point_bits``: the code widths that carry
    ``zero_point``; the others use the symmetric grid (``None``: every width).  vLLM's kernels take zero points at
    4 bits only (Marlin's ``uint4``): its plans hold ``(4,)``.

    GPTQ only:
    - ``act_order``: quantize columns by decreasing ``diag(H)`` (activation energy).
    - ``group_params``: ``static`` (default) fixes every group's scale and zero
      from the original, unpermuted weights before GPTQ starts (llm-compressor's
      "static" act-order; the groups are the RTN groups, no ``g_idx``);
      ``dynamic`` takes them when a group starts in processing order from the
      already-updated weights (the GPTQ paper; with act-order the groups follow
      the permuted order and a per-column ``g_idx`` is stored).
      ``QuantizerSpec(method="gptq", act_order=True)`` is static act-order.
    - ``damp``: fraction of ``mean(diag H)`` added to the Hessian diagonal.
    - ``propagation``: ``sequential`` (default) calibrates every linear on the
      signals of the already-quantized model (earlier layers, and within a layer
      q/k/v -> o -> gate/up -> down), so a layer's result depends on the bits of
      all earlier layers; ``dense`` calibrates on the dense model's signals, so
      each (layer, bits) result is independent and cacheable on its own (fast
      what-ifs, a little less accurate).
    """

    method: str = "rtn"
    bits: int = 4
    group_size: int | None = 128
    act_order: bool = False
    damp: float = 0.01
    zero_point: str = "integer"
    group_params: str = "static"
    propagation: str = "sequential"
    ggml_types: str = "k-quants"
    imatrix: bool = False
    output_type: str = "auto"
    zero_point_bits: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise QuantizationError(f"Unknown quantizer '{self.method}'. Choose one of {', '.join(METHODS)}.")
        if self.method == LLAMACPP:
            from engine.quant.ggml_types import OUTPUT_TYPES, TypeChoiceError, levels

            try:
                offered = levels(self.ggml_types)
            except TypeChoiceError as err:
                raise QuantizationError(str(err)) from err
            if self.bits not in offered:
                raise QuantizationError(f"llama.cpp's {self.ggml_types} types have no {self.bits}-bit type; choose "
                                        f"one of {', '.join(map(str, offered))} bits.")
            if self.output_type not in OUTPUT_TYPES:
                raise QuantizationError(f"Unknown output type '{self.output_type}'; choose one of "
                                        f"{', '.join(OUTPUT_TYPES)}.")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not MIN_BITS <= self.bits <= MAX_BITS:
            raise QuantizationError(
                f"{self.bits!r} bits is not supported: choose an integer from {MIN_BITS} to {MAX_BITS} "
                "(keep a layer dense instead of quantizing it above 8 bits)."
            )
        gs = self.group_size
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise QuantizationError(
                f"Group size {gs!r} is invalid: use a positive number of input columns "
                "(128 is usual) or None for one scale per output row."
            )
        if self.act_order and self.method != "gptq":
            raise QuantizationError("Activation ordering only applies to GPTQ; turn it off for RTN.")
        if self.zero_point not in ZERO_POINTS:
            raise QuantizationError(f"Unknown zero point '{self.zero_point}'. Choose one of {', '.join(ZERO_POINTS)}.")
        if self.zero_point_bits is not None:  # a stored spec holds a list
            object.__setattr__(self, "zero_point_bits", tuple(int(b) for b in self.zero_point_bits))
        if not 0.0 < float(self.damp) <= 1.0:
            raise QuantizationError(f"GPTQ damping {self.damp!r} must be in (0, 1]; 0.01 is usual.")
        if self.group_params not in GROUP_PARAMS:
            raise QuantizationError(f"Unknown group parameters '{self.group_params}'. Choose 'static' or 'dynamic'.")
        if self.propagation not in PROPAGATIONS:
            raise QuantizationError(f"Unknown propagation '{self.propagation}'. Choose 'sequential' or 'dense'.")

    @property
    def needs_calibration(self) -> bool:
        """Whether quantizing needs calibration windows (GPTQ; llama.cpp types with an imatrix)."""
        return self.method == "gptq" or (self.method == LLAMACPP and self.imatrix)

    @property
    def stores_group_index(self) -> bool:
        """Whether quantized weights carry a per-column group index (dynamic-group act-order GPTQ)."""
        return self.method == "gptq" and self.act_order and self.group_params == "dynamic"

    @property
    def sequential(self) -> bool:
        """Whether a layer's result depends on the bits of the layers before it (sequential GPTQ)."""
        return self.method == "gptq" and self.propagation == "sequential"

    def with_bits(self, bits: int) -> QuantizerSpec:
        """The same quantizer at another bit width (validated)."""
        return replace(self, bits=bits)

    def zero_point_at(self, bits: int) -> str:
        """The grid weights of ``bits`` bits are quantized on (:func:`zero_point_at`)."""
        return zero_point_at(bits, self.zero_point, self.zero_point_bits)

    @property
    def grid(self) -> str:
        """The zero point of this spec's own width (:meth:`zero_point_at`): what the quantizers use."""
        return self.zero_point_at(self.bits)

    def to_dict(self) -> dict:
        """The fields; the llama.cpp-only ones only for llama.cpp specs (other specs' cache keys stay as they were)."""
        fields = asdict(self)
        if self.method != LLAMACPP:
            for name in ("ggml_types", "imatrix", "output_type"):
                fields.pop(name)
        if self.zero_point_bits is None:
            fields.pop("zero_point_bits")  # the keys of specs without it stay as they were
        else:
            fields["zero_point_bits"] = list(self.zero_point_bits)
        return fields

    def label(self) -> str:
        if self.method == LLAMACPP:
            return (f"llama.cpp {self.ggml_types}{', imatrix' if self.imatrix else ''}"
                    f"{'' if self.output_type == 'auto' else f', output {self.output_type}'}")
        group = "per-row" if self.group_size is None else f"g{self.group_size}"
        extra = ""
        if self.method == "gptq":
            extra += (", act-order" if self.act_order else "") + (", dynamic groups" if self.group_params == "dynamic"
                                                                  else "")
            extra += ", dense signals" if self.propagation == "dense" else ""
        extra += ZERO_POINT_LABELS[self.grid] if self.grid != "integer" else ""
        return f"{self.method.upper()} {self.bits}-bit {group}{extra}"


def zero_point_at(bits: int, zero_point: str, zero_point_bits: tuple[int, ...] | None) -> str:
    """The grid ``bits``-bit weights go on: ``zero_point``, or symmetric where ``zero_point_bits`` (the widths that
    carry it; ``None``: all) leaves ``bits`` out."""
    return "symmetric" if zero_point_bits is not None and bits not in zero_point_bits else zero_point


def symmetric_zero(bits: int) -> int:
    """The fixed zero point of the symmetric grid: the middle code, ``2**(bits-1)``."""
    return 2 ** (bits - 1)


def weight_storage_bits(out_features: int, in_features: int, bits: int, group_size: int | None,
                        group_index: bool = False, zero_point: str = "integer", packed_zeros: bool = False) -> int:
    """Bits needed to store one quantized ``[out, in]`` weight.

    Codes ``out·in·bits`` + fp16 scale and fp16 zero per group and row (no zero for the symmetric grid)
    (+ int32 ``g_idx`` per input column when ``group_index``: dynamic-group
    act-order GPTQ).  4 bits with group 128 gives 4 + 32/128 = 4.25 bits per weight.
    ``packed_zeros``: integer zero points stored at the code width, as a compressed-tensors checkpoint packs them
    (4 bits with group 64: 4 + 20/64 = 4.3125 bits per weight).
    """
    groups = 1 if group_size is None else math.ceil(in_features / group_size)
    if zero_point == "symmetric":
        zero_bits = 0  # fixed at the middle code, not stored
    elif zero_point == "integer" and packed_zeros:
        zero_bits = bits  # packed at the code width (compressed-tensors)
    else:
        zero_bits = FP16_BITS  # an fp16 number (LayerLab's files; the float grid's minimum)
    per_group = FP16_BITS + zero_bits
    total = out_features * in_features * bits + out_features * groups * per_group
    if group_index and groups > 1:
        total += in_features * GIDX_BITS
    return total


class QuantizedWeight:
    """One quantized linear weight as stored.

    ``codes``: uint8 ``[out, in]`` in ``[0, 2**bits - 1]``, held packed in memory
    (``packed``: 2-, 4- or 8-bit slots per byte along each row, see
    :mod:`engine.quant.packing`; ``codes`` unpacks on access); ``scales`` /
    ``zeros``: fp16 ``[out, n_groups]`` (``zeros``: integer zero points, the
    group minimum with ``zero_point="float"``, or ``2**(bits-1)`` everywhere
    with ``zero_point="symmetric"``); ``g_idx``: int32 ``[in]`` group of
    each input column, or ``None`` for consecutive groups of ``group_size``
    columns.  ``group_size`` is the effective size (``in`` for one group per row).

    Build it from codes (``QuantizedWeight(codes=..., ...)``) or from an already
    packed tensor (``packed=..., in_features=...``).
    """

    def __init__(self, codes: torch.Tensor | None = None, scales: torch.Tensor | None = None,
                 zeros: torch.Tensor | None = None, bits: int = 4, group_size: int = 128, method: str = "rtn",
                 g_idx: torch.Tensor | None = None, zero_point: str = "integer", *,
                 packed: torch.Tensor | None = None, in_features: int | None = None) -> None:
        if (codes is None) == (packed is None):
            raise ValueError("Give either codes or packed codes (with in_features).")
        if codes is not None:
            in_features, packed = int(codes.shape[1]), pack_rows(codes, bits)
        elif in_features is None:
            raise ValueError("Packed codes need in_features.")
        self.packed, self.in_features = packed, int(in_features)
        self.scales, self.zeros, self.bits, self.group_size = scales, zeros, bits, group_size
        self.method, self.g_idx, self.zero_point = method, g_idx, zero_point

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[out, in]`` (a new tensor, except at 5-8 bits)."""
        return unpack_rows(self.packed, self.bits, self.in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.packed.shape[0]), self.in_features

    def to(self, device: torch.device | str) -> QuantizedWeight:
        """The same weight on ``device`` (packed tensors moved, nothing unpacked); ``self`` if already there."""
        if self.packed.device == torch.device(device):
            return self
        def move(t):
            return None if t is None else t.to(device)
        return QuantizedWeight(scales=move(self.scales), zeros=move(self.zeros), bits=self.bits,
                               group_size=self.group_size, method=self.method, g_idx=move(self.g_idx),
                               zero_point=self.zero_point, packed=move(self.packed), in_features=self.in_features)

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def group_index(self) -> torch.Tensor:
        """Group of every input column, int64 ``[in]``."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1], device=self.packed.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the model uses, ``[out, in]``, computed in fp32 then cast to ``dtype``.

        ``(code - zero) * scale`` (integer zero points) or ``code * scale + zero`` (float).
        """
        scales, zeros = self.scales.float(), self.zeros.float()
        weight = self.codes.float()
        if self.g_idx is not None:
            index = self.g_idx.long()
            return apply_grid(weight, scales[:, index], zeros[:, index], self.zero_point).to(dtype)
        out, inp = self.shape
        gs = self.group_size
        full = (inp // gs) * gs  # whole groups as a [out, groups, gs] view, then a shorter last group
        if full:
            body = weight[:, :full].view(out, full // gs, gs)
            apply_grid(body, scales[:, : full // gs, None], zeros[:, : full // gs, None], self.zero_point)
        if full < inp:
            apply_grid(weight[:, full:], scales[:, -1:], zeros[:, -1:], self.zero_point)
        return weight.to(dtype)

    def storage_bits(self) -> int:
        out, inp = self.shape
        return weight_storage_bits(out, inp, self.bits, None if self.n_groups == 1 else self.group_size,
                                   self.g_idx is not None, self.zero_point)

    def bits_per_weight(self) -> float:
        return self.storage_bits() / (self.shape[0] * self.shape[1])

    def nbytes_in_memory(self) -> int:
        """Bytes held: packed codes, fp16 scales and zeros, int32 group index."""
        extra = 0 if self.g_idx is None else self.g_idx.numel() * 4
        return self.packed.numel() + (self.scales.numel() + self.zeros.numel()) * 2 + extra


# --- the grid ---------------------------------------------------------------

def apply_grid(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, zero_point: str) -> torch.Tensor:
    """In place on float ``codes`` (returned): ``(codes - zero) * scale`` or ``codes * scale + zero``.

    ``scale`` / ``zero`` broadcast against ``codes``; the result is the weight value of each code.
    """
    if zero_point != "float":
        return codes.sub_(zero).mul_(scale)
    return codes.mul_(scale).add_(zero)


def _round_up_fp16(values: torch.Tensor) -> torch.Tensor:
    """Smallest fp16 value >= each fp32 value (so the grid still covers the range)."""
    tiny = torch.finfo(torch.float16).tiny
    values = values.clamp_min(tiny)
    half = values.to(torch.float16)
    low = half.float() < values
    if low.any():
        half = torch.where(low, torch.nextafter(half, torch.full_like(half, math.inf)), half)
    if torch.isinf(half).any():
        raise QuantizationError("A weight group spans more than fp16 scales can hold; this weight cannot be quantized.")
    return half


def _round_down_fp16(values: torch.Tensor) -> torch.Tensor:
    """Largest fp16 value <= each fp32 value."""
    half = values.to(torch.float16)
    high = half.float() > values
    if high.any():
        half = torch.where(high, torch.nextafter(half, torch.full_like(half, -math.inf)), half)
    if torch.isinf(half).any():
        raise QuantizationError("A weight is beyond the fp16 range; this weight cannot be quantized.")
    return half


def grid_params(weight: torch.Tensor, bits: int, zero_point: str = "integer") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16, rounded up) and zero (fp16) per row of ``weight [rows, k]``, each ``[rows]``.

    Integer zero points: range ``[min(w, 0), max(w, 0)]``, ``zero = round(-min / scale)``.
    Float: range ``[m, max(w)]`` with ``m`` = min(w) rounded down to fp16, ``zero = m``,
    scale rounded to the nearest fp16.  Symmetric: ``scale = 2 max|w| / maxq`` rounded up,
    ``zero = 2**(bits-1)``.
    """
    maxq = 2**bits - 1
    w = weight.float()
    if zero_point == "symmetric":
        scale = 2 * w.abs().max(dim=1).values / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return _round_up_fp16(scale), torch.full_like(scale, symmetric_zero(bits), dtype=torch.float16)
    if zero_point == "float":
        offset = _round_down_fp16(w.min(dim=1).values)
        scale = (w.max(dim=1).values - offset.float()) / maxq
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        # nearest fp16 is safe here: (max - m) / scale16 <= maxq + 0.25, so clamping costs < scale / 2;
        # and an fp16 scale that was already exact (a Q4_1 model) is kept exactly
        scale16 = scale.clamp_min(torch.finfo(torch.float16).tiny).to(torch.float16)
        if torch.isinf(scale16).any():
            raise QuantizationError("A weight group spans more than fp16 scales can hold; it cannot be quantized.")
        return scale16, offset
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale16 = _round_up_fp16(scale)
    zero = torch.round(-xmin / scale16.float()).clamp(0, maxq)
    return scale16, zero.to(torch.float16)


def quantize_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor,
                     zero_point: str = "integer") -> torch.Tensor:
    """Codes (``w``'s float dtype, integer-valued) of ``w`` on the grid: the nearest grid point.

    ``scale`` / ``zero`` (fp16 or float) broadcast against ``w``; ``bits`` is
    one width or a tensor of widths broadcasting against ``w`` (rows of
    several bit widths quantized together).
    """
    dtype = w.dtype if w.dtype.is_floating_point else torch.float32
    if scale.dtype != dtype or zero.dtype != dtype:
        scale, zero = scale.to(dtype), zero.to(dtype)
    if zero_point != "float":
        codes = torch.round(w / scale + zero)
    else:
        codes = torch.round((w - zero) / scale)
    if isinstance(bits, torch.Tensor):
        return codes.clamp_min_(0).minimum(2**bits - 1)
    return codes.clamp_(0, 2**bits - 1)


# --- RTN --------------------------------------------------------------------

def effective_group_size(in_features: int, group_size: int | None) -> int:
    return in_features if group_size is None else min(group_size, in_features)


def rtn_quantize(weight: torch.Tensor, spec: QuantizerSpec) -> QuantizedWeight:
    """Round-to-nearest group-wise quantization of ``weight [out, in]``."""
    if weight.dim() != 2:
        raise QuantizationError(f"Expected a 2-D linear weight, got shape {tuple(weight.shape)}.")
    out, inp = weight.shape
    gs = effective_group_size(inp, spec.group_size)
    groups = math.ceil(inp / gs)
    w = weight.detach().float()
    padded = torch.cat([w, w[:, -1:].expand(out, groups * gs - inp)], dim=1)  # repeats stay in range
    grouped = padded.reshape(out * groups, gs)
    scale, zero = grid_params(grouped, spec.bits, spec.grid)
    codes = quantize_to_grid(grouped, scale[:, None], zero[:, None], spec.bits, spec.grid)
    codes = codes.reshape(out, groups * gs)[:, :inp].to(torch.uint8)
    return QuantizedWeight(codes=codes.contiguous(), scales=scale.reshape(out, groups),
                           zeros=zero.reshape(out, groups), bits=spec.bits, group_size=gs, method="rtn",
                           zero_point=spec.grid)
