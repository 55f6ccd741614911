"""Memory plans: the peak memory a run will need beyond the loaded model, checked before it starts.

A plan is an estimate from shapes alone (no tensor is allocated): the variant
the run builds, what it holds only while it builds it (a working copy,
calibration signals, Hessians or covariances) and the activations of
evaluation.  The loaded model itself is already resident, so a run fits when
``extra_bytes`` is below the device's free memory (CPU: ``MemAvailable``;
CUDA: ``torch.cuda.mem_get_info``).  ``bench/scale.py`` prints the plan next
to the measured peak.

What each method holds (``s`` = bytes per base weight, ``n x T`` calibration tokens):

- dropping: nothing of its own (the variant shares the base's tensors);
- quantization (RTN): the packed codes (2-bit: a quarter byte per weight, 3/4-bit:
  half a byte, 5-8-bit: one byte) and fp16 scales and zeros per group; GPTQ also
  a working copy of the model, the calibration signals (``n x T x hidden x s``,
  inputs and outputs of a layer) and an fp64 Hessian per linear input;
- slicing: the sliced model's new tensors (planned as a full copy; 0.86 of it at
  25% on the 1.1B benchmark), fp32 signals and fp64 covariances ``hidden x hidden``;
- evaluation: a batch's logits (or one chunk of positions' when the head is
  applied in chunks) and per-layer intermediates, and the fp32 log-softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

import torch
from torch import nn

from engine.core.architectures import Architecture

GIB = 2**30
HEADROOM = 1.10  # the plan must fit with 10% to spare (allocator slack, fragmentation)
class MemoryProfile(StrEnum):
    """What a run holds while it builds and evaluates (each method in :mod:`engine.methods` names its profile)."""

    DROPPING = "dropping"  # the base's own tensors, nothing built
    RTN = "quantization-rtn"  # codes (or a materialised copy)
    GPTQ = "quantization-gptq"  # codes, plus a working copy, calibration signals and Hessians while building
    SLICING = "slicing"  # a sliced copy, plus calibration signals and covariances while building


PROFILES = tuple(MemoryProfile)


@dataclass(frozen=True)
class ModelShape:
    """What memory estimates need from a model: bytes, widths, vocabulary and its layers' linears."""

    bytes: int
    element_size: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    linear_shapes: tuple[tuple[int, int], ...]  # (out, in) of every decoder-layer linear

    @classmethod
    def of(cls, model: nn.Module, arch: Architecture) -> ModelShape:
        params = list(model.parameters())
        config = model.config
        shapes = tuple(tuple(linear.weight.shape) for layer in arch.decoder_layers(model)
                       for linear in arch.layer_linears(layer).values())
        hidden = int(getattr(config, "hidden_size", 0) or max(i for _, i in shapes))
        return cls(bytes=sum(p.numel() * p.element_size() for p in params),
                   element_size=params[0].element_size(), hidden=hidden,
                   intermediate=max(max(o, i) for o, i in shapes), vocab=int(config.vocab_size),
                   heads=int(getattr(config, "num_attention_heads", 1) or 1), linear_shapes=shapes)


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated memory of one run on ``device`` beyond the loaded model (bytes).

    ``parts``: what the run holds at its peak, by name; ``extra_bytes`` their sum;
    ``base_bytes`` the loaded model; ``free_bytes`` free memory now (``None``: unknown).
    """

    device: str
    method: str
    base_bytes: int
    parts: dict[str, int] = field(default_factory=dict)
    free_bytes: int | None = None

    @property
    def extra_bytes(self) -> int:
        return sum(self.parts.values())

    @property
    def peak_over_base(self) -> float:
        """Peak memory (base + extra) as a multiple of the base model's bytes."""
        return (self.base_bytes + self.extra_bytes) / self.base_bytes

    def fits(self) -> bool:
        return self.free_bytes is None or self.extra_bytes * HEADROOM <= self.free_bytes

    def summary(self) -> str:
        """One line for the UI and CLI, e.g.
        ``Memory: ≈ +210 MiB at peak beyond the loaded model (…); 17.9 GiB free``."""
        parts = ", ".join(f"{name} {size_text(value)}" for name, value in self.parts.items())
        free = f"{size_text(self.free_bytes)} free on {self.device}" if self.free_bytes is not None else \
            f"free memory on {self.device} unknown"
        return (f"Memory: ≈ +{size_text(self.extra_bytes)} at peak beyond the loaded model "
                f"({self.peak_over_base:.2f}× its {size_text(self.base_bytes)}: {parts}); {free}.")

    def refusal(self) -> str | None:
        """Why the run cannot start here, and what would make it fit; ``None`` when it fits."""
        if self.fits():
            return None
        largest = max(self.parts, key=self.parts.get)
        return (f"This run needs ≈ {size_text(self.extra_bytes * HEADROOM)} more on {self.device} but only "
                f"{size_text(self.free_bytes)} are free; the largest part is {largest} "
                f"({size_text(self.parts[largest])}). "
                f"{ADVICE.get(largest, 'Close other sessions or load the model on a larger device.')}")


ADVICE = {
    "working copy": "This method works on a full copy of the model: load it in a 16-bit dtype, use a "
                    "smaller model, or free memory (close other sessions).",
    "sliced model": "Every weight slicing changes is a new tensor (up to the base's size): load the model in a "
                    "16-bit dtype, use a smaller model, or free memory (close other sessions).",
    "calibration signals": "Use fewer calibration windows or a shorter calibration seqlen.",
    "evaluation activations": "Use a shorter evaluation seqlen (the logits of a batch dominate).",
    "Hessians": "Use RTN, or a model with narrower linears.",
    "covariances": "Use fewer layers or a narrower model.",
}


def size_text(n_bytes: float | None) -> str:
    """``"1.25 GiB"`` from 1 GiB up, else ``"310.4 MiB"``."""
    if n_bytes is None:
        return "?"
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB else f"{n_bytes / 2**20:.1f} MiB"


def free_bytes(device: torch.device | str) -> int | None:
    """Free memory on ``device`` now: CUDA's free bytes, or the host's ``MemAvailable``; ``None`` if unknown.

    On CUDA, blocks PyTorch's allocator holds in its cache but no tensor uses count as free (earlier runs
    leave them behind; new tensors reuse them).
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(torch.cuda.mem_get_info(device)[0]) + max(0, cached)
        except (RuntimeError, AssertionError, ValueError):  # no such device: the load reports it
            return None
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def evaluation_bytes(shape: ModelShape, batch: int, seqlen: int, head_chunk: int | None = None) -> int:
    """Activations of one evaluation forward: the logits, one layer's intermediates and its attention scores.

    Logits: a batch's (model dtype) and the fp32 log-softmax of one window; with ``head_chunk`` (the head
    applied to that many positions at a time, :mod:`engine.evaluation.perplexity`) only a chunk's (model
    dtype, its fp32 copy and the fp32 log-softmax).
    """
    s = shape.element_size
    if head_chunk:
        logits = min(head_chunk, batch * seqlen) * shape.vocab * (s + 8)
    else:
        logits = batch * seqlen * shape.vocab * s + 2 * seqlen * shape.vocab * 4
    return logits + activation_bytes(shape, batch, seqlen)


def activation_bytes(shape: ModelShape, batch: int, seqlen: int) -> int:
    """One layer's intermediates and its fp32 attention scores for a batch of ``batch`` windows (no logits)."""
    layer = batch * seqlen * (4 * shape.hidden + 3 * shape.intermediate) * shape.element_size
    attention = batch * shape.heads * seqlen * seqlen * 4
    return layer + attention


EVAL_BUDGET = 0.03  # evaluation activations may use this fraction of the model's bytes (a batch of 1 always runs)


def evaluation_batch(shape: ModelShape, seqlen: int, requested: int = 4, budget: float = EVAL_BUDGET) -> int:
    """Windows per evaluation forward: the most, up to ``requested``, whose :func:`activation_bytes` stay
    within ``budget`` of the model's bytes; at least 1.
    The built-in model at 256 tokens and a 1B model at 512 evaluate one
    window at a time (as fast per token on a CPU as four), a 135M model at 64 tokens four at a time.
    """
    fitting = int(budget * shape.bytes // max(1, activation_bytes(shape, 1, seqlen)))
    return max(1, min(int(requested), fitting))


def slot_bits(bits: int) -> int:
    """The slot width (2, 4 or 8 bits) that holds a ``bits``-bit code in memory (:mod:`engine.quant.packing`)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"Codes of {bits} bits cannot be packed into bytes (1 to 8 bits).")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes one packed row of ``in_features`` codes takes."""
    return math.ceil(in_features * slot_bits(bits) / 8)


def code_bytes(shape: ModelShape, group_size: int | None, code_bits: int = 8) -> int:
    """Bytes a quantized variant holds: codes packed in ``code_bits``-bit slots (2, 4 or 8; the highest level
    of the allocation, so a mixed one is bounded above), fp16 scale and zero per group."""
    total = 0
    for out, inp in shape.linear_shapes:
        groups = 1 if group_size is None else math.ceil(inp / group_size)
        total += out * packed_row_bytes(inp, code_bits) + out * groups * 4
    return total


def plan_memory(shape: ModelShape, method: str, device: torch.device | str, *, calib_tokens: int = 0,
                eval_batch: int = 4, eval_seqlen: int = 0, group_size: int | None = 128, code_bits: int = 8,
                holds_codes: bool = True, head_chunk: int | None = None, free: int | None = None) -> MemoryPlan:
    """The memory plan of ``method`` (one of :data:`PROFILES`) for a model of ``shape``.

    ``calib_tokens``: calibration tokens (windows x seqlen); ``eval_seqlen``: evaluation window
    length (0: no evaluation); ``code_bits``: the highest bit level of a quantization;
    ``holds_codes``: the quantized variant holds codes (else it is a materialised copy); ``head_chunk``:
    evaluation applies the head to that many positions at a time (``None``: full logits); ``free``: free
    bytes (default: measured on ``device``).
    """
    if method not in PROFILES:
        raise ValueError(f"Unknown memory profile '{method}'; choose one of {', '.join(PROFILES)}.")
    s, hidden = shape.element_size, shape.hidden
    held: dict[str, int] = {}  # kept from compression through evaluation
    building: dict[str, int] = {}  # only while the variant is built
    if method in (MemoryProfile.RTN, MemoryProfile.GPTQ):
        held["codes" if holds_codes else "materialised copy"] = \
            code_bytes(shape, group_size, code_bits) if holds_codes else shape.bytes
        if method == MemoryProfile.GPTQ:
            building["working copy"] = shape.bytes
            building["calibration signals"] = 2 * calib_tokens * hidden * s
            building["Hessians"] = 2 * 8 * max(i for _, i in shape.linear_shapes) ** 2
    elif method == MemoryProfile.SLICING:
        held["sliced model"] = shape.bytes  # new tensors over the base's: at most a full copy (0.86 at 25%)
        building["calibration signals"] = 2 * calib_tokens * hidden * 4
        building["covariances"] = 2 * 8 * hidden * hidden
    evaluation = {"evaluation activations": evaluation_bytes(shape, eval_batch, eval_seqlen, head_chunk)
                  if eval_seqlen else 0}
    # the peak is the larger of the two phases, on top of what the variant holds throughout
    phase = building if sum(building.values()) > sum(evaluation.values()) else evaluation
    parts = {**held, **phase}
    return MemoryPlan(device=str(device), method=method, base_bytes=shape.bytes, parts=parts,
                      free_bytes=free if free is not None else free_bytes(device))
