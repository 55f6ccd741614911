"""SliceGPT with constant, LR-driven dynamic or custom schedules (METHODS.md §2, §3).

Public API::

    schedule = schedule_dynamic(lr_scores, target=0.25, basis=0.10)   # or schedule_constant / schedule_custom
    result = slice_model(model, architecture, calibration_windows, schedule)
    result.model, result.dims, result.report
    save_sliced(result, folder); load_sliced(folder)

Slicing fractions are unitless in [0, 1) (0.25 = drop 25% of the residual
dimensions); dims are counts of residual dimensions; times are seconds.

Wiring (METHODS §2 step 4, also used for constant schedules): the embedding
writes ``d_0``; layer ``i`` reads ``d_i``, keeps ``d_i`` between attention and
MLP, and writes ``d_{i+1}``; the last layer writes the full hidden size ``D``
(rotated, not sliced), so the head is rotated but not sliced.  This matches
SliceGPT's default (``do_slice_head=False``) and the dynamic-slicing reference.

The input model is never modified: a deep copy is fused, rotated and sliced
layer by layer, with calibration signals on CPU and each layer moved to the
work device in turn.  Embeddings are not centred (RMSNorm needs no centring,
and centring breaks exactness).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.architectures import Architecture, architecture_for, get_submodule
from engine.data import TokenWindows
from engine.evaluate import model_device
from engine.models import model_size
from engine.rotation import fuse_norms, untie_head
from engine.slicegpt import ProgressFn, rotate_and_slice
from engine.sliced_layers import load_sliced_folder, save_sliced_folder

DEFAULT_ROUND_TO = 8


class ScheduleError(ValueError):
    """A slicing schedule is impossible; the message says what is wrong and what to do."""


# ---------------------------------------------------------------- schedules


@dataclass(frozen=True)
class SlicingSchedule:
    """Per-layer slicing fractions ``FS_i`` (before rounding), one per decoder layer.

    ``kind`` is ``constant``, ``dynamic`` or ``custom``; ``target`` is the
    nominal mean fraction SP; ``basis`` is SB (dynamic only); ``lr_scores``
    the LR vector the dynamic schedule was built from.
    """

    kind: str
    fractions: tuple[float, ...]
    target: float
    basis: float | None = None
    lr_scores: tuple[float, ...] | None = None

    @property
    def num_layers(self) -> int:
        return len(self.fractions)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SlicingSchedule:
        lr = data.get("lr_scores")
        return cls(data["kind"], tuple(data["fractions"]), data["target"], data.get("basis"),
                   tuple(lr) if lr is not None else None)


def _check_fraction(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ScheduleError(
            f"{name} must be a fraction in [0, 1) (e.g. 0.25 for 25%), got {value}."
        )
    return value


def schedule_constant(target: float, num_layers: int) -> SlicingSchedule:
    """Plain SliceGPT: every layer sliced by ``target`` (SP in [0, 1))."""
    target = _check_fraction("The slicing fraction SP", target)
    if num_layers < 1:
        raise ScheduleError(f"A schedule needs at least one layer, got num_layers={num_layers}.")
    return SlicingSchedule("constant", (target,) * num_layers, target)


def _min_basis(target: float, ratio: float) -> float:
    """Smallest SB keeping the most redundant layer below FS = 1 (``ratio = max(v)/mean(v)``)."""
    return (target * ratio - 1.0) / (ratio - 1.0)


def schedule_dynamic(lr_scores: Sequence[float], target: float, basis: float) -> SlicingSchedule:
    """LR-driven schedule: ``FS_i = SB + (SP − SB) · v_i / mean(v)``, ``v`` = min-max normalised LR.

    ``lr_scores`` has one LR score per layer (higher = more redundant);
    ``target`` is SP, ``basis`` is SB, with ``0 ≤ SB ≤ SP < 1``.  The mean of
    the fractions is SP and the least redundant layer gets SB exactly.
    SB = SP gives the constant schedule whatever the scores.
    """
    target = _check_fraction("The target slicing fraction SP", target)
    basis = float(basis)
    if not math.isfinite(basis) or basis < 0:
        raise ScheduleError(f"The slicing basis SB must be ≥ 0, got {basis}. Use 0 ≤ SB ≤ SP.")
    if basis > target:
        raise ScheduleError(
            f"The slicing basis SB={basis} is larger than the target SP={target}; "
            "every layer would be sliced more than the average. Use SB ≤ SP."
        )
    scores = [float(s) for s in lr_scores]
    if not scores:
        raise ScheduleError("The LR score vector is empty; compute layer scores first.")
    if not all(math.isfinite(s) for s in scores):
        raise ScheduleError(f"The LR scores contain NaN or infinite values: {scores}. Recompute the scores.")
    if basis == target:
        return SlicingSchedule("dynamic", (target,) * len(scores), target, basis, tuple(scores))
    low, high = min(scores), max(scores)
    if high == low:
        raise ScheduleError(
            f"All {len(scores)} LR scores are equal ({low}), so min-max normalisation divides by zero. "
            "Use a constant schedule, or set SB = SP."
        )
    v = [(s - low) / (high - low) for s in scores]
    ratio = 1.0 / statistics.fmean(v)
    fractions = tuple(basis + (target - basis) * vi * ratio for vi in v)
    worst = max(range(len(fractions)), key=fractions.__getitem__)
    if fractions[worst] >= 1.0:
        raise ScheduleError(
            f"SP={target}, SB={basis} would slice layer {worst} by {fractions[worst]:.3f} (≥ 100% of its "
            f"dimensions): this LR profile concentrates slicing there. Raise SB to at least "
            f"{_min_basis(target, ratio):.3f}, or lower SP."
        )
    return SlicingSchedule("dynamic", fractions, target, basis, tuple(scores))


def schedule_custom(fractions: Sequence[float]) -> SlicingSchedule:
    """A user's per-layer fractions, each in [0, 1); ``target`` is their mean."""
    values = tuple(_check_fraction(f"The slicing fraction of layer {i}", f) for i, f in enumerate(fractions))
    if not values:
        raise ScheduleError("The custom schedule is empty; give one fraction per decoder layer.")
    return SlicingSchedule("custom", values, statistics.fmean(values))


def round_dim(value: float, multiple: int, hidden_size: int) -> int:
    """``value`` rounded to the nearest multiple of ``multiple`` (halves up), capped at ``hidden_size``.

    An unsliced layer (``value ≥ hidden_size``) keeps ``hidden_size`` even when
    that is not a multiple.
    """
    if value >= hidden_size:
        return hidden_size
    return min(hidden_size, math.floor(value / multiple + 0.5) * multiple)


def schedule_dims(schedule: SlicingSchedule, hidden_size: int, round_to: int = DEFAULT_ROUND_TO) -> list[int]:
    """Per-layer residual dims ``d_i = D · (1 − FS_i)`` rounded to ``round_to``: ``[L]`` ints."""
    if round_to < 1:
        raise ScheduleError(f"round_to must be a positive number of dimensions, got {round_to}.")
    dims = [round_dim(hidden_size * (1.0 - f), round_to, hidden_size) for f in schedule.fractions]
    for i, (d, f) in enumerate(zip(dims, schedule.fractions)):
        if d <= 0:
            raise ScheduleError(
                f"Layer {i} (fraction {f:.3f}) would keep {hidden_size * (1 - f):.1f} of {hidden_size} "
                f"dimensions, which rounds to 0 with round_to={round_to}. Lower SP, raise SB, or use a "
                "smaller round_to."
            )
    return dims


def achieved_fraction(dims: Sequence[int], hidden_size: int) -> float:
    """Mean slicing fraction actually applied: ``mean(1 − d_i / D)``."""
    return statistics.fmean(1.0 - d / hidden_size for d in dims)


def _resolve_dims(plan, num_layers: int, hidden_size: int, round_to: int) -> tuple[list[int], SlicingSchedule]:
    if isinstance(plan, SlicingSchedule):
        if plan.num_layers != num_layers:
            raise ScheduleError(
                f"The schedule has {plan.num_layers} fractions but the model has {num_layers} decoder "
                "layers. Build the schedule for this model (one value per layer)."
            )
        return schedule_dims(plan, hidden_size, round_to), plan
    dims = [int(d) for d in plan]
    if len(dims) != num_layers:
        raise ScheduleError(f"Got {len(dims)} dims for a model with {num_layers} decoder layers; give one per layer.")
    if any(not 0 < d <= hidden_size for d in dims):
        raise ScheduleError(f"Every dim must be in 1..{hidden_size} (the hidden size); got {dims}.")
    return dims, schedule_custom([1.0 - d / hidden_size for d in dims])


# ---------------------------------------------------------------- report


@dataclass
class SlicingReport:
    """What slicing did.

    ``dims`` are the kept residual dimensions per layer (of ``hidden_size``),
    rounded to multiples of ``round_to``; fractions are unitless means over
    layers (``nominal`` before rounding, ``achieved`` after); parameter counts
    are real element counts (untied head and shortcut matrices included);
    ``seconds`` is wall time.  ``calibration_tokens`` below ``hidden_size``
    makes the PCA rank-deficient: use more calibration text.
    """

    hidden_size: int
    dims: list[int]
    round_to: int
    nominal_fraction: float
    achieved_fraction: float
    params_dense: int
    params_sliced: int
    shortcut_params: int
    seconds: float
    final_rotation: bool
    calibration: str = ""
    calibration_tokens: int = 0

    @property
    def param_ratio(self) -> float:
        """Sliced / dense parameter count (can exceed 1 for small models: untied head + shortcuts)."""
        return self.params_sliced / self.params_dense

    def to_dict(self) -> dict:
        return {**asdict(self), "param_ratio": self.param_ratio}

    @classmethod
    def from_dict(cls, data: dict) -> SlicingReport:
        return cls(**{k: v for k, v in data.items() if k != "param_ratio"})


@dataclass
class SlicingResult:
    """A sliced model (a new object; the input is untouched) and how it was made."""

    model: nn.Module
    dims: list[int]
    schedule: SlicingSchedule
    report: SlicingReport
    architecture: Architecture
    source: str = ""
    meta: dict = field(default_factory=dict)


def shortcut_parameters(model: nn.Module, architecture: Architecture) -> int:
    """Entries of all shortcut matrices of a sliced model."""
    total = 0
    for layer in architecture.decoder_layers(model):
        for name in ("attn_shortcut", "mlp_shortcut"):
            matrix = getattr(layer, name, None)
            total += matrix.numel() if matrix is not None else 0
    return total


@torch.no_grad()
def forward_latency(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of one forward pass on ``input_ids`` ``[batch, seq]``."""
    ids = input_ids.to(model_device(model))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_latency(dense: nn.Module, sliced: nn.Module, input_ids: torch.Tensor, repeats: int = 5) -> dict:
    """``{"dense_s", "sliced_s", "speedup"}``: median forward seconds and dense / sliced."""
    dense_s = forward_latency(dense, input_ids, repeats)
    sliced_s = forward_latency(sliced, input_ids, repeats)
    return {"dense_s": dense_s, "sliced_s": sliced_s, "speedup": dense_s / sliced_s}


def slice_model(
    model: nn.Module,
    architecture: Architecture,
    calibration: TokenWindows,
    plan: SlicingSchedule | Sequence[int],
    *,
    round_to: int = DEFAULT_ROUND_TO,
    final_rotation: bool = False,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
    source: str = "",
) -> SlicingResult:
    """Slice a copy of ``model`` with SliceGPT; ``model`` itself is not modified.

    ``calibration.input_ids`` ``[n, T]`` feeds the PCA (``attention_mask``
    ``[n, T]``, 1 = real token, excludes padding).  ``plan`` is a
    :class:`SlicingSchedule` (dims rounded to ``round_to``) or explicit dims
    ``[L]``.  ``final_rotation`` multiplies every kept basis by a random
    orthogonal matrix (seeded by ``seed``).  Layers are moved to ``device``
    (default: the model's) one at a time and back; ``progress(done, total)``
    is called after each layer.  Raises :class:`ScheduleError` for bad plans.
    """
    started = time.perf_counter()
    if attention_mask is not None and attention_mask.shape != calibration.input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the calibration windows are "
            f"{tuple(calibration.input_ids.shape)}; give one 0/1 entry per token."
        )
    layers_in = architecture.decoder_layers(model)
    hidden_size = int(get_submodule(model, architecture.embedding).weight.shape[1])
    dims, schedule = _resolve_dims(plan, len(layers_in), hidden_size, round_to)
    work_device = torch.device(device) if device is not None else model_device(model)
    generator = torch.Generator().manual_seed(seed) if final_rotation else None
    sliced = copy.deepcopy(model).eval()
    with torch.no_grad():
        untie_head(sliced, architecture)
        fuse_norms(sliced, architecture, hidden_size)
    tokens = rotate_and_slice(
        sliced, architecture, calibration.input_ids, dims, attention_mask=attention_mask,
        batch_size=batch_size, device=work_device, generator=generator, progress=progress,
    )
    report = SlicingReport(
        hidden_size=hidden_size, dims=dims, round_to=round_to,
        nominal_fraction=schedule.target, achieved_fraction=achieved_fraction(dims, hidden_size),
        params_dense=model_size(model)["params"], params_sliced=model_size(sliced)["params"],
        shortcut_params=shortcut_parameters(sliced, architecture), seconds=time.perf_counter() - started,
        final_rotation=final_rotation, calibration=calibration.label(), calibration_tokens=tokens,
    )
    return SlicingResult(sliced, dims, schedule, report, architecture, source, {"seed": seed})


# ---------------------------------------------------------------- save / load


def save_sliced(result: SlicingResult, folder: str | Path) -> Path:
    """Save a sliced model as ``model.safetensors`` + ``slicing.json`` in ``folder``."""
    dtype = str(next(result.model.parameters()).dtype).replace("torch.", "")
    meta = {
        "source": result.source,
        "architecture": result.architecture.model_type,
        "dims": result.dims,
        "dtype": dtype,
        "schedule": result.schedule.to_dict(),
        "report": result.report.to_dict(),
        "meta": result.meta,
    }
    return save_sliced_folder(result.model, folder, meta)


def load_sliced(folder: str | Path, device: str | torch.device = "cpu") -> SlicingResult:
    """Rebuild a model saved by :func:`save_sliced` (no original weights needed)."""
    model, config = load_sliced_folder(folder, device)
    return SlicingResult(
        model=model,
        dims=[int(d) for d in config["dims"]],
        schedule=SlicingSchedule.from_dict(config["schedule"]),
        report=SlicingReport.from_dict(config["report"]),
        architecture=architecture_for(config["model_type"]),
        source=config.get("source", ""),
        meta=config.get("meta", {}),
    )
