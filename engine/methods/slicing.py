"""Slicing (SliceGPT; docs/methods.md §2-3): remove a share of the residual width per layer after rotating it
by PCA.  The schedule is constant, LR-dynamic (from the stored LR scores) or a custom list."""

from __future__ import annotations

from pathlib import Path

from engine.core.architectures import Feature
from engine.core.data import DataSpec, token_windows
from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel, model_size
from engine.core.progress import StageProgress, stage_callback
from engine.methods.base import NOT_QUANTIZED, REMOTE_CODE, Compressed, Method, RunCost, calibration_of
from engine.quant.runtimes import Runtime
from engine.runs.cached_scores import scores_for
from engine.runs.plans import SlicingPlan
from engine.runs.record import RunRecord
from engine.runs.store import ResultsStore
from engine.slicing.schedules import SlicingSchedule, schedule_constant, schedule_custom, schedule_dynamic
from engine.slicing.slice_model import save_sliced, slice_model


def slicing_schedule(store: ResultsStore, loaded: LoadedModel, plan: SlicingPlan, calibration: DataSpec,
                     progress: StageProgress | None = None, compute: bool = True) -> SlicingSchedule:
    """The per-layer schedule a plan asks for (dynamic uses the LR scores of ``calibration``).

    ``compute=False`` (previews): raise :class:`~engine.runs.cached_scores.ScoresNotComputed` instead of scoring.
    """
    if plan.schedule == "constant":
        return schedule_constant(plan.target, loaded.num_layers)
    if plan.schedule == "custom":
        return schedule_custom(plan.fractions)
    lr, _zd = scores_for(store, loaded, calibration, compute, progress)
    return schedule_dynamic(lr.lr, plan.target, plan.basis)


class Slicing(Method):
    name = "slicing"
    plan_type = SlicingPlan
    title = "slicing"
    folder = "sliced"
    measures_latency = True

    def refusal(self, loaded: LoadedModel, plan: SlicingPlan, saving: bool = False) -> str | None:
        return loaded.architecture.unavailable_message(Feature.SLICING)

    def cost(self, plan: SlicingPlan) -> RunCost:
        return RunCost(passes=1.52, fixed_per_hidden=5.8)

    def memory_profile(self, plan: SlicingPlan) -> MemoryProfile:
        return MemoryProfile.SLICING

    def reads_calibration(self, plan: SlicingPlan) -> bool:
        return True

    def prepare(self, store, loaded, plan, calibration, progress=None, compute=True) -> SlicingSchedule:
        return slicing_schedule(store, loaded, plan, calibration, progress, compute)

    def compress(self, store, loaded, plan: SlicingPlan, prepared: SlicingSchedule, calibration: DataSpec,
                 progress=None) -> Compressed:
        windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
        result = slice_model(loaded, prepared, windows, round_to=plan.round_to, final_rotation=plan.final_rotation,
                             progress=stage_callback(progress, "slicing"))
        report = result.report
        size = {"params": report.params_sliced, "param_fraction": report.param_ratio,
                "bytes": model_size(result.model)["bytes"], "shortcut_params": report.shortcut_params,
                "achieved_fraction": report.achieved_fraction, "nominal_fraction": report.nominal_fraction,
                "bytes_16bit": 2 * report.params_sliced,
                "size_fraction": report.param_ratio}  # bytes at 16 bits vs dense at 16 bits
        config = {"series": plan.series(), "schedule": plan.schedule, "target": plan.target,
                  "basis": plan.basis if plan.schedule == "dynamic" else None, "round_to": plan.round_to,
                  "final_rotation": plan.final_rotation, "dims": result.dims, "calibration": windows.label(),
                  "calibration_spec": calibration.to_dict()}  # lets exports rebuild the same model
        return Compressed(result.model, size, config, artifact=result)

    def save(self, compressed: Compressed, folder: str | Path, tokenizer=None) -> Path:
        return save_sliced(compressed.artifact, folder)

    def rebuild(self, loaded: LoadedModel, record: RunRecord, progress=None):
        windows = token_windows(calibration_of(record), loaded.tokenizer, loaded.max_seqlen)
        return slice_model(loaded, [int(d) for d in record.config["dims"]], windows,
                           final_rotation=bool(record.config.get("final_rotation")),
                           progress=stage_callback(progress, "slicing")).model

    def runs_in(self, config: dict) -> str:
        return REMOTE_CODE

    def deployment(self, plan: SlicingPlan, runtime: Runtime) -> str | None:
        if not runtime.deployable:
            return None
        where = ("Its Hugging Face folder runs in transformers with the modelling file LayerLab writes beside it "
                 "(`trust_remote_code=True`)")
        if runtime.key == "transformers":
            return f"{where}: a sliced model's layers have their own widths and shortcut matrices on the residual path."
        return (f"{runtime.label} cannot run a sliced model as it is: its layers have their own widths and shortcut "
                f"matrices on the residual path, which {runtime.label}'s model code lacks. {where}. To ship to "
                f"{runtime.label}, quantize, or drop whole layers.")

    def export_formats(self, record, loaded=None) -> dict[str, str | None]:
        return {"hf": None, **NOT_QUANTIZED}
