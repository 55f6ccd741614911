"""SliceGPT with constant, LR-driven dynamic or custom schedules (docs/methods.md §2, §3).

Public API::

    schedule = schedule_dynamic(lr_scores, target=0.25, basis=0.10)   # or schedule_constant / schedule_custom
    result = slice_model(loaded, schedule, calibration_windows)
    result.model, result.dims, result.report
    save_sliced(result, folder); load_sliced(folder)

Slicing fractions are unitless in [0, 1) (0.25 = drop 25% of the residual
dimensions); dims are counts of residual dimensions; times are seconds.

Wiring (docs/methods.md §2 step 4, also used for constant schedules): the embedding
writes ``d_0``; layer ``i`` reads ``d_i``, keeps ``d_i`` between attention and
MLP, and writes ``d_{i+1}``; the last layer writes the full hidden size ``D``
(rotated, not sliced), so the head is rotated but not sliced.  This matches
SliceGPT's default (``do_slice_head=False``) and the dynamic-slicing reference.

The input model is never modified: its shell copy (own modules, the base's
tensors; every changed weight is a new tensor) is fused, rotated and sliced
layer by layer, with calibration signals on CPU and each layer moved to the
work device in turn.  Embeddings are not centred (RMSNorm needs no centring,
and centring breaks exactness).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from engine.core.architectures import Architecture, Feature, architecture_of, get_submodule
from engine.core.data import TokenWindows
from engine.core.models import LoadedModel, model_size
from engine.core.progress import ProgressFn
from engine.core.sharing import shell_copy
from engine.evaluation.perplexity import model_device
from engine.slicing.rotation import fuse_norms, untie_head
from engine.slicing.schedules import (
    DEFAULT_ROUND_TO,
    ScheduleError,
    SlicingSchedule,
    achieved_fraction,
    schedule_custom,
    schedule_dims,
)
from engine.slicing.sliced_layers import load_sliced_folder, save_sliced_folder
from engine.slicing.slicegpt import rotate_and_slice


class SlicingUnsupportedError(ValueError):
    """This model's layout cannot be sliced exactly; the message says why (other features still work)."""


def pca_rank_warning(calibration_tokens: int, hidden_size: int) -> str | None:
    """A warning when calibration has fewer tokens than the hidden size (rank-deficient PCA), else None."""
    if calibration_tokens >= hidden_size:
        return None
    return (f"Calibration has {calibration_tokens} tokens, fewer than the hidden size ({hidden_size}): the PCA is "
            "rank-deficient and sliced models lose much more. Use more or longer calibration windows.")


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


def slice_model(
    base: LoadedModel,
    schedule: SlicingSchedule | Sequence[int],
    calibration: TokenWindows,
    *,
    round_to: int = DEFAULT_ROUND_TO,
    final_rotation: bool = False,
    seed: int = 0,
    attention_mask: torch.Tensor | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    progress: ProgressFn | None = None,
) -> SlicingResult:
    """Slice a copy of ``base.model`` with SliceGPT; the base model itself is not modified.

    ``calibration.input_ids`` ``[n, T]`` feeds the PCA (``attention_mask``
    ``[n, T]``, 1 = real token, excludes padding).  ``schedule`` is a
    :class:`SlicingSchedule` (dims rounded to ``round_to``) or explicit dims
    ``[L]``.  ``final_rotation`` multiplies every kept basis by a random
    orthogonal matrix (seeded by ``seed``).  Layers are moved to ``device``
    (default: the model's) one at a time and back; ``progress(done, total)``
    is called after each layer.  Raises :class:`ScheduleError` for bad plans.
    """
    model, architecture = base.model, base.architecture
    refusal = architecture.reason(Feature.SLICING)
    if refusal:
        raise SlicingUnsupportedError(f"{architecture.model_type} cannot be sliced: {refusal}")
    started = time.perf_counter()
    if attention_mask is not None and attention_mask.shape != calibration.input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the calibration windows are "
            f"{tuple(calibration.input_ids.shape)}; give one 0/1 entry per token."
        )
    layers_in = architecture.decoder_layers(model)
    hidden_size = int(get_submodule(model, architecture.embedding).weight.shape[1])
    dims, schedule = _resolve_dims(schedule, len(layers_in), hidden_size, round_to)
    work_device = torch.device(device) if device is not None else model_device(model)
    generator = torch.Generator().manual_seed(seed) if final_rotation else None
    # the sliced model's own module tree over the base's tensors; fusing, rotating and slicing replace
    # each weight they change (never write into one), so the base is untouched and no full copy is made
    sliced = shell_copy(model).eval()
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
    return SlicingResult(sliced, dims, schedule, report, architecture, base.source, {"seed": seed})


# ---------------------------------------------------------------- save / load


def save_sliced(result: SlicingResult, folder: str | Path, overwrite: bool = False) -> Path:
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
    return save_sliced_folder(result.model, folder, meta, overwrite)


def load_sliced(folder: str | Path, device: str | torch.device = "cpu") -> SlicingResult:
    """Rebuild a model saved by :func:`save_sliced` (no original weights needed)."""
    model, config = load_sliced_folder(folder, device)
    return SlicingResult(
        model=model,
        dims=[int(d) for d in config["dims"]],
        schedule=SlicingSchedule.from_dict(config["schedule"]),
        report=SlicingReport.from_dict(config["report"]),
        architecture=architecture_of(model),
        source=config.get("source", ""),
        meta=config.get("meta", {}),
    )
