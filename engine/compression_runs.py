"""Slicing and quantization runs from plain settings: schedule/allocation, compress, evaluate, store.

The plans are what a user sets with sliders or CLI flags.  Each run compresses
a copy of the loaded model (the engine functions never touch the original),
evaluates it with :func:`engine.experiments.store_compressed`, and optionally
saves it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.allocation import Allocation, allocate_average, allocate_fraction, layer_order
from engine.data import DataSpec, token_windows
from engine.experiments import EvalPlan, RunOutcome, StageProgress, compute_scores, stage_callback, store_compressed
from engine.models import LoadedModel, model_size
from engine.quant_save import save_quantized
from engine.quantize import quantize_model
from engine.quantizers import QuantizerSpec
from engine.scores import zd_importance
from engine.slicing import (
    SlicingSchedule,
    compare_latency,
    save_sliced,
    schedule_constant,
    schedule_custom,
    schedule_dynamic,
    slice_model,
)
from engine.store import ResultsStore, Timer

SCHEDULES = ("dynamic", "constant", "custom")
ORDERINGS = ("lim", "zd", "random", "reversed-lim", "custom")


@dataclass(frozen=True)
class SlicingPlan:
    """Slicing settings: schedule kind, target SP, basis SB, custom fractions, rounding."""

    schedule: str = "dynamic"
    target: float = 0.25
    basis: float = 0.10
    fractions: tuple[float, ...] = ()
    round_to: int = 8
    final_rotation: bool = False

    def series(self) -> str:
        """Curve label on trade-off charts."""
        return f"dynamic SB={self.basis:g}" if self.schedule == "dynamic" else self.schedule


def slicing_schedule(store: ResultsStore, loaded: LoadedModel, plan: SlicingPlan, calibration: DataSpec,
                     progress: StageProgress | None = None) -> SlicingSchedule:
    """The per-layer schedule a plan asks for (dynamic uses cached LR scores of ``calibration``)."""
    if plan.schedule == "constant":
        return schedule_constant(plan.target, loaded.num_layers)
    if plan.schedule == "custom":
        return schedule_custom(plan.fractions)
    lr, _zd, _hit = compute_scores(store, loaded, calibration, progress=progress)
    return schedule_dynamic(lr.lr, plan.target, plan.basis)


def run_slicing(
    store: ResultsStore, loaded: LoadedModel, plan: SlicingPlan, calibration: DataSpec, evaluation: EvalPlan,
    save_to: str | None = None, progress: StageProgress | None = None,
) -> RunOutcome:
    """Slice a copy with SliceGPT, evaluate, store (and save if ``save_to``)."""
    schedule = slicing_schedule(store, loaded, plan, calibration, progress)
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    with Timer() as timer:
        result = slice_model(loaded.model, loaded.architecture, windows, schedule, round_to=plan.round_to,
                             final_rotation=plan.final_rotation, progress=stage_callback(progress, "slicing"),
                             source=loaded.source)
    report, dense = result.report, model_size(loaded.model)
    sample = windows.input_ids[:1]
    size = {
        "params": report.params_sliced, "param_fraction": report.param_ratio,
        "bytes": model_size(result.model)["bytes"], "shortcut_params": report.shortcut_params,
        "achieved_fraction": report.achieved_fraction, "nominal_fraction": report.nominal_fraction,
        **{f"latency_{k}": v for k, v in compare_latency(loaded.model, result.model, sample, repeats=3).items()},
    }
    size["size_fraction"] = size["bytes"] / dense["bytes"]
    config = {
        "series": plan.series(), "schedule": plan.schedule, "target": plan.target,
        "basis": plan.basis if plan.schedule == "dynamic" else None, "round_to": plan.round_to,
        "final_rotation": plan.final_rotation, "dims": result.dims, "calibration": windows.label(),
    }
    if save_to:
        config["saved_to"] = str(save_sliced(result, save_to))
    return store_compressed(store, loaded, result.model, "slicing", config, size, evaluation,
                            timer.seconds, progress)


@dataclass(frozen=True)
class QuantPlan:
    """Layer-wise quantization settings (METHODS.md §4)."""

    quantizer: str = "rtn"
    group_size: int | None = 128
    high_bits: int = 4
    low_bits: int = 2
    low_fraction: float | None = 0.25
    target_bits: float | None = None
    ordering: str = "lim"
    custom_order: tuple[int, ...] = ()
    seed: int = 0
    zero_point: str = "integer"

    def series(self) -> str:
        return f"{self.ordering} {self.high_bits}/{self.low_bits}-bit {self.quantizer}"

    def spec(self) -> QuantizerSpec:
        """The underlying per-weight quantizer (at the high level)."""
        return QuantizerSpec(method=self.quantizer, bits=self.high_bits, group_size=self.group_size,
                             zero_point=self.zero_point)


def allocation_for(store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec,
                   progress: StageProgress | None = None) -> tuple[Allocation, list[float] | None]:
    """Bits per layer (the plan's ordering, then its low-bit fraction or target average),
    and the importance scores that ordered them (None for random and custom orders)."""
    n, importance = loaded.num_layers, None
    if plan.ordering in ("lim", "zd", "reversed-lim"):
        lr, zd, _hit = compute_scores(store, loaded, calibration, progress=progress)
        importance = zd_importance(zd.zd_layer) if plan.ordering == "zd" else lr.lim
        kind = "reversed" if plan.ordering == "reversed-lim" else "importance"
        order = layer_order(n, kind, importance)
    elif plan.ordering == "random":
        order = layer_order(n, "random", seed=plan.seed)
    else:
        order = layer_order(n, "custom", permutation=plan.custom_order)
    if plan.target_bits is not None:
        return allocate_average(order, [plan.high_bits, plan.low_bits], plan.target_bits), importance
    return allocate_fraction(order, plan.high_bits, plan.low_bits, plan.low_fraction or 0.0), importance


def run_quantization(
    store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec, evaluation: EvalPlan,
    save_to: str | None = None, progress: StageProgress | None = None,
) -> RunOutcome:
    """Quantize a copy layer-wise, evaluate, store (and save if ``save_to``)."""
    allocation, _importance = allocation_for(store, loaded, plan, calibration, progress)
    spec = plan.spec()
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen) if plan.quantizer == "gptq" else None
    with Timer() as timer:
        quantized = quantize_model(loaded, allocation, spec, windows, progress=stage_callback(progress, "quantizing"))
    size = quantized.size()
    dense = model_size(loaded.model)
    metrics = {
        "bytes": size.total_bytes, "size_fraction": size.compression, "params": dense["params"],
        "param_fraction": 1.0, "avg_bits": allocation.average_bits, "bits_per_weight": size.bits_per_weight,
        "unquantized_bytes": size.unquantized_bytes, "unquantized_fraction": size.unquantized_fraction,
        "cache_computed": quantized.stats.computed,
        "cache_hits": quantized.stats.memory_hits + quantized.stats.disk_hits,
    }
    config = {
        "series": plan.series(), "quantizer": plan.quantizer, "group_size": plan.group_size,
        "high_bits": plan.high_bits, "low_bits": plan.low_bits, "low_fraction": plan.low_fraction,
        "target_bits": plan.target_bits, "ordering": plan.ordering, "bits": list(allocation.bits),
        "zero_point": plan.zero_point, "warnings": quantized.warnings,
        "calibration": windows.label() if windows is not None else None,
    }
    if save_to:
        config["saved_to"] = str(save_quantized(quantized, save_to, tokenizer=loaded.tokenizer, overwrite=True))
    return store_compressed(store, loaded, quantized.model, "quantization", config, metrics, evaluation,
                            timer.seconds, progress)
