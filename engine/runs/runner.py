"""Runs: plan -> schedule / allocation -> compressed copy -> evaluation -> one stored record.

Pages and the CLI call only these functions.  Every ``run_*`` evaluates
perplexity on ``evaluation`` (and optional zero-shot tasks), adds size metrics
and the change against the dense model measured on the *same* windows
(measured once and reused), and writes exactly one record at the very end, so
an interrupted run leaves nothing behind.  Progress goes to
``progress(stage, done, total)``.  The shared base model is never modified:
every compression works on a copy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.memory import ModelShape, evaluation_batch
from engine.core.models import LoadedModel, dense_size_metrics, model_size
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.paths import cache_root, unused_folder
from engine.core.progress import StageProgress, Timer, stage_callback
from engine.dropping.drop_model import drop_model, save_dropped
from engine.evaluation.divergence import DenseReference, DivergenceMeter, cached_reference, remember
from engine.evaluation.latency import compare_latency, describe_seconds, estimate_seconds
from engine.evaluation.paired import paired_change
from engine.evaluation.perplexity import perplexity
from engine.evaluation.zeroshot import TaskUnavailableError, zero_shot
from engine.export.gguf_llamacpp import llamacpp_details
from engine.quant.allocation import Allocation, allocate_average, allocate_fraction, layer_order
from engine.quant.grid import LLAMACPP
from engine.quant.quantize_model import quantize_model
from engine.quant.save import save_quantized
from engine.runs.cached_scores import scores_for
from engine.runs.drop_choice import dropped_layers
from engine.runs.memory_check import check_memory, run_memory_plan
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan
from engine.runs.record import CHANGE, CHANGE_HIGH, CHANGE_LOW, PPL, WINDOW_NLL, RunRecord, task_metrics
from engine.runs.store import ResultsStore
from engine.scores.ranking import zd_importance
from engine.slicing.schedules import SlicingSchedule, schedule_constant, schedule_custom, schedule_dynamic
from engine.slicing.slice_model import save_sliced, slice_model


@dataclass
class RunOutcome:
    """A stored run: its record and the model that was evaluated."""

    record: RunRecord
    model: torch.nn.Module

    @property
    def run_id(self) -> int:
        return self.record.id

    @property
    def metrics(self) -> dict:
        return self.record.metrics

    @property
    def config(self) -> dict:
        return self.record.config

    @property
    def data(self) -> dict:
        return self.record.data


# ---------------------------------------------------------------- evaluation


def dense_reference(loaded: LoadedModel, windows: TokenWindows,
                    progress: StageProgress | None = None) -> DenseReference:
    """Dense's top-k next-token distribution on ``windows`` (cached; one dense pass when missing)."""
    found = cached_reference(loaded.fingerprint, windows)
    if found is None:
        found = DenseReference.empty(windows.n_windows * (windows.seqlen - 1))
        batch = evaluation_batch(ModelShape.of(loaded.model, loaded.architecture), windows.seqlen)
        perplexity(loaded.model, windows, batch_size=batch, progress=stage_callback(progress, "dense reference"),
                   observer=found.observe)
        remember(loaded.fingerprint, windows, found)
    return found


def evaluate_model(loaded: LoadedModel, model: torch.nn.Module, plan: EvalPlan,
                   progress: StageProgress | None = None, dense: bool = False) -> tuple[dict, dict]:
    """(metrics, data) of ``model``: perplexity, its interval, KL divergence to dense on the same windows
    (compressed models; ``dense=True`` records dense's reference instead), and zero-shot accuracies."""
    windows = token_windows(plan.data, loaded.tokenizer, loaded.max_seqlen)
    batch = evaluation_batch(ModelShape.of(loaded.model, loaded.architecture), windows.seqlen, plan.batch_size)
    if dense:
        recorder = DenseReference.empty(windows.n_windows * (windows.seqlen - 1))
        observer = recorder.observe
    else:
        meter = DivergenceMeter(dense_reference(loaded, windows, progress))
        observer = meter.observe
    result = perplexity(model, windows, batch_size=batch, progress=stage_callback(progress, "perplexity"),
                        observer=observer)
    metrics = result.to_metrics()
    if dense:
        remember(loaded.fingerprint, windows, recorder)
    else:
        metrics.update(meter.result().to_metrics())
    task_error = None
    if plan.tasks:
        try:
            for score in zero_shot(model, loaded.tokenizer, list(plan.tasks), limit=plan.task_limit,
                                   progress=stage_callback(progress, "zero-shot")):
                metrics.update(task_metrics(score.task, score.value, score.stderr, score.n, score.metric))
        except TaskUnavailableError as err:  # keep the perplexity already measured; say why accuracy is missing
            task_error = str(err)
    data = {**plan.data.to_dict(), "n_windows": windows.n_windows, "available_windows": windows.available,
            "label": windows.label(), "bos": windows.bos}
    if plan.tasks:
        data["tasks"] = [t for t in plan.tasks if task_error is None]
        data["task_limit"] = plan.task_limit
    if task_error:
        data["task_error"] = task_error
    return metrics, data


def _store(store: ResultsStore, loaded: LoadedModel, method: str, config: dict, data: dict, metrics: dict,
           seconds: float) -> RunRecord:
    run_id = store.add_run(model=loaded.source, model_fingerprint=loaded.fingerprint, method=method,
                           config=config, data=data, metrics=metrics, duration_s=seconds)
    return store.get_run(run_id)


def find_dense(store: ResultsStore, loaded: LoadedModel, plan: EvalPlan) -> RunRecord | None:
    """The newest stored dense run of this exact model on the same windows with every task of ``plan``."""
    label = token_windows(plan.data, loaded.tokenizer, loaded.max_seqlen).label()
    for run in store.runs(model=loaded.source, method="dense"):
        if run.model_fingerprint == loaded.fingerprint and run.data_label == label \
                and (set(plan.tasks) <= set(run.data.get("tasks", [])) or run.data.get("task_error")):
            return run
    return None


@explain_out_of_memory("Measuring dense")
def run_dense(store: ResultsStore, loaded: LoadedModel, plan: EvalPlan,
              progress: StageProgress | None = None) -> RunOutcome:
    """Evaluate the uncompressed model and store it as method ``dense``."""
    with Timer() as timer:
        metrics, data = evaluate_model(loaded, loaded.model, plan, progress, dense=True)
    metrics.update(dense_size_metrics(loaded.model))
    config = {"series": "dense", "preview": plan.preview}
    return RunOutcome(_store(store, loaded, "dense", config, data, metrics, timer.seconds), loaded.model)


def ensure_dense(store: ResultsStore, loaded: LoadedModel, plan: EvalPlan,
                 progress: StageProgress | None = None) -> RunRecord:
    """The dense run on ``plan``'s windows: the stored one, or measured now (once) and stored."""
    found = find_dense(store, loaded, plan)
    return found if found is not None else run_dense(store, loaded, plan, progress).record


def compare_with_dense(metrics: dict, dense: RunRecord) -> dict:
    """Change against dense on the same windows: ``dense_run``, ``dense_ppl``, ``ppl_change`` (fraction) and,
    from the paired per-window losses, its 95% interval ``ppl_change_low`` / ``ppl_change_high``."""
    out = {"dense_run": dense.id, "dense_ppl": dense.metrics.get(PPL)}
    if metrics.get(PPL) is not None and dense.metrics.get(PPL):
        out[CHANGE] = metrics[PPL] / dense.metrics[PPL] - 1.0
        mine, theirs = metrics.get(WINDOW_NLL) or [], dense.metrics.get(WINDOW_NLL) or []
        if mine and len(mine) == len(theirs):
            paired = paired_change(theirs, mine, int(metrics["seqlen"]) - 1)
            out.update({CHANGE: paired.change, CHANGE_LOW: paired.low, CHANGE_HIGH: paired.high})
    return out


def store_compressed(store: ResultsStore, loaded: LoadedModel, model: torch.nn.Module, method: str, config: dict,
                     size_metrics: dict, plan: EvalPlan, seconds: float,
                     progress: StageProgress | None = None) -> RunOutcome:
    """Evaluate a compressed copy (and dense on the same windows, if missing) and store it."""
    dense = ensure_dense(store, loaded, plan, progress)
    with Timer() as timer:
        metrics, data = evaluate_model(loaded, model, plan, progress)
    metrics.update(size_metrics)
    metrics.update(compare_with_dense(metrics, dense))
    metrics["compress_s"] = seconds
    config = {**config, "preview": plan.preview}
    record = _store(store, loaded, method, config, data, metrics, seconds + timer.seconds)
    return RunOutcome(record, model)


# ---------------------------------------------------------------- scores


def needs_scores(plan: SlicingPlan | QuantPlan | DropPlan) -> bool:
    """Whether a plan's schedule / ordering / choice is computed from LR or ZD scores."""
    if isinstance(plan, SlicingPlan):
        return plan.schedule == "dynamic"
    if isinstance(plan, DropPlan):
        return plan.by != "custom"
    return plan.ordering in ("lim", "zd", "reversed-lim")


# Run time = (passes · calibration tokens + evaluations · evaluated tokens + fixed · hidden size) / forward
# throughput (evaluations: 2 while dense is not stored on these windows, else 1), with
# both constants fitted to measured runs of the built-in model at 8 × 128 / 4 × 128 and 16 × 256 / 16 × 256
# (bench/estimates.py, idle machine).  The fixed part is per-layer work that does not grow with the text:
# PCA eigendecompositions and weight rotations (slicing), GPTQ's column loops, quantizing every weight,
# and the latency check every run makes; in forward-token equivalents it grows with the model's width.
RUN_PASSES = {"slicing": 1.2, "quantization-rtn": 0.26, "quantization-gptq": 0.5, "dropping": 0.0}
"""Cost of compressing that grows with the text, in forward passes over the calibration tokens."""
RUN_FIXED_PER_HIDDEN = {"slicing": 4.6, "quantization-rtn": 0.7, "quantization-gptq": 13.2, "dropping": 2.2}
"""Cost that does not grow with the text, in forward-token equivalents per unit of hidden size."""


def estimate_run_seconds(loaded: LoadedModel, method: str, calibration: DataSpec, evaluation: EvalPlan,
                         store: ResultsStore | None = None, dense_needed: bool | None = None) -> float:
    """Rough wall time (s) of one run: compression, plus dense and compressed evaluation.

    ``method``: ``slicing``, ``quantization-rtn``, ``quantization-gptq`` or ``dropping``.  Dense is counted
    only when no dense run on these windows is stored yet (or as ``dense_needed`` says).  ``bench/estimates.py``
    compares it with measured runs.
    """
    calib = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen).input_ids.numel()
    evaluated = token_windows(evaluation.data, loaded.tokenizer, loaded.max_seqlen).input_ids.numel()
    if dense_needed is None:
        dense_needed = store is None or find_dense(store, loaded, evaluation) is None
    passes_eval = 1 + int(dense_needed)
    fixed = RUN_FIXED_PER_HIDDEN[method] * loaded.hidden_size
    return estimate_seconds(loaded.model, RUN_PASSES[method] * calib + passes_eval * evaluated + fixed)


def run_estimate(loaded: LoadedModel, method: str, calibration: DataSpec, evaluation: EvalPlan,
                 store: ResultsStore | None = None) -> str:
    """:func:`estimate_run_seconds` as button text, e.g. ``"≈ 40 s"``."""
    seconds = estimate_run_seconds(loaded, method, calibration, evaluation, store)
    return describe_seconds(seconds) + (" + zero-shot tasks" if evaluation.tasks else "")


def evaluation_seconds(loaded: LoadedModel, spec: DataSpec) -> float:
    """Rough wall time (s) of one perplexity evaluation over ``spec``'s windows."""
    return estimate_seconds(loaded.model, token_windows(spec, loaded.tokenizer, loaded.max_seqlen).input_ids.numel())


def scoring_seconds(loaded: LoadedModel, spec: DataSpec) -> float:
    """Rough wall time (s) of one LR scoring pass over ``spec``'s windows."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    return estimate_seconds(loaded.model, windows.input_ids.numel())


def scoring_estimate(loaded: LoadedModel, spec: DataSpec) -> str:
    """:func:`scoring_seconds` as button text."""
    return describe_seconds(scoring_seconds(loaded, spec))


# ---------------------------------------------------------------- slicing


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


def default_save_folder(loaded: LoadedModel, method: str, plan: SlicingPlan | QuantPlan | DropPlan) -> Path:
    """A new folder under ``cache/<method>/`` named after the model and plan (never an existing one)."""
    kind = {"slicing": "sliced", "quantization": "quantized", "dropping": "dropped"}.get(method, method)
    return unused_folder(cache_root() / kind / f"{loaded.fingerprint}-{plan.name()}")


@explain_out_of_memory("The slicing run")
def run_slicing(store: ResultsStore, loaded: LoadedModel, plan: SlicingPlan, calibration: DataSpec,
                evaluation: EvalPlan, *, schedule: SlicingSchedule | None = None, save_to: str | Path | None = None,
                progress: StageProgress | None = None) -> RunOutcome:
    """Slice a copy with SliceGPT, evaluate, store (and save if ``save_to``).

    ``schedule``: the one the user previewed (computed from ``plan`` if None).
    """
    check_memory(run_memory_plan(loaded, "slicing", calibration, evaluation))
    if schedule is None:
        schedule = slicing_schedule(store, loaded, plan, calibration, progress)
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    with Timer() as timer:
        result = slice_model(loaded, schedule, windows, round_to=plan.round_to, final_rotation=plan.final_rotation,
                             progress=stage_callback(progress, "slicing"))
    report = result.report
    latency = compare_latency(loaded.model, result.model, windows.input_ids[:1], repeats=3)
    size = {
        "params": report.params_sliced, "param_fraction": report.param_ratio,
        "bytes": model_size(result.model)["bytes"], "shortcut_params": report.shortcut_params,
        "achieved_fraction": report.achieved_fraction, "nominal_fraction": report.nominal_fraction,
        **{f"latency_{k}": v for k, v in latency.items()},
    }
    size["bytes_16bit"] = 2 * report.params_sliced
    size["size_fraction"] = report.param_ratio  # bytes at 16 bits vs dense at 16 bits
    config = {
        "series": plan.series(), "schedule": plan.schedule, "target": plan.target,
        "basis": plan.basis if plan.schedule == "dynamic" else None, "round_to": plan.round_to,
        "final_rotation": plan.final_rotation, "dims": result.dims, "calibration": windows.label(),
        "calibration_spec": calibration.to_dict(),  # lets exports rebuild the same model
    }
    if save_to:
        config["saved_to"] = str(save_sliced(result, save_to))
    return store_compressed(store, loaded, result.model, "slicing", config, size, evaluation, timer.seconds, progress)


# ---------------------------------------------------------------- quantization


def allocation_for(store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec,
                   progress: StageProgress | None = None,
                   compute: bool = True) -> tuple[Allocation, list[float] | None]:
    """Bits per layer (the plan's ordering, then its low-bit fraction or target average),
    and the importance scores that ordered them (None for random and custom orders).

    ``compute=False`` (previews): raise :class:`~engine.runs.cached_scores.ScoresNotComputed` instead of scoring.
    """
    n, importance = loaded.num_layers, None
    if plan.ordering in ("lim", "zd", "reversed-lim"):
        lr, zd = scores_for(store, loaded, calibration, compute, progress)
        importance = zd_importance(zd.zd_layer) if plan.ordering == "zd" else lr.lim
        kind = "reversed" if plan.ordering == "reversed-lim" else "importance"
        order = layer_order(n, kind, importance)
    elif plan.ordering == "random":
        order = layer_order(n, "random", seed=plan.seed)
    elif plan.ordering in ("optimizer", "optimizer-module"):
        raise ValueError("Optimizer allocations come from 'Optimize for budget' (engine.runs.bits_optimizer); "
                         "pass the chosen allocation to the run.")
    else:
        order = layer_order(n, "custom", permutation=plan.custom_order)
    if plan.target_bits is not None:
        return allocate_average(order, [plan.high_bits, plan.low_bits], plan.target_bits), importance
    return allocate_fraction(order, plan.high_bits, plan.low_bits, plan.low_fraction or 0.0), importance


@explain_out_of_memory("The quantization run")
def run_quantization(store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec,
                     evaluation: EvalPlan, *, allocation: Allocation | None = None,
                     save_to: str | Path | None = None, progress: StageProgress | None = None) -> RunOutcome:
    """Quantize a copy layer-wise, evaluate, store (and save if ``save_to``).

    ``allocation``: the bit map the user previewed (computed from ``plan`` if None).
    """
    if save_to and plan.quantizer == LLAMACPP:
        raise ValueError("A run in llama.cpp's types is saved as its GGUF file: run it without saving, then export "
                         "it as GGUF (Export, or `python -m engine export RUN --format gguf`).")
    top = max(allocation.levels) if allocation is not None else plan.top_bits
    check_memory(run_memory_plan(loaded, f"quantization-{'gptq' if plan.quantizer == 'gptq' else 'rtn'}",
                                 calibration, evaluation, plan.group_size, top))
    if allocation is None:
        allocation, _importance = allocation_for(store, loaded, plan, calibration, progress)
    spec = plan.spec()
    windows: TokenWindows | None = None
    if spec.needs_calibration:
        windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    with Timer() as timer:
        quantized = quantize_model(loaded, allocation, windows, spec=spec,
                                   progress=stage_callback(progress, "quantizing"))
    size = quantized.size()
    llamacpp = llamacpp_details(loaded, spec, quantized.bits) if spec.method == LLAMACPP else {}
    if llamacpp.get("file_bytes"):
        size = replace(size, file_bytes=llamacpp["file_bytes"])
    dense = model_size(loaded.model)
    metrics = {
        "bytes": size.total_bytes, "bytes_16bit": size.total_bytes_16bit, "size_fraction": size.compression_16bit,
        "params": dense["params"],
        "param_fraction": 1.0, "bits_per_weight": size.bits_per_weight,
        # per layer as docs/methods.md averages them; per-module allocations by weight (code bits per weight)
        "avg_bits": size.code_bits_per_weight if allocation.per_module else allocation.average_bits,
        "unquantized_bytes": size.unquantized_bytes, "unquantized_fraction": size.unquantized_fraction,
        "cache_computed": quantized.stats.computed,
        "cache_hits": quantized.stats.memory_hits + quantized.stats.disk_hits,
    }
    config = {
        "series": plan.series(), "quantizer": plan.quantizer, "group_size": plan.group_size,
        "high_bits": plan.high_bits, "low_bits": plan.low_bits,
        "low_fraction": None if allocation.per_module else allocation.low_fraction(plan.low_bits),
        "target_bits": plan.target_bits, "ordering": plan.ordering, "bits": list(allocation.bits),
        "zero_point": plan.zero_point, "act_order": spec.act_order, "warnings": quantized.warnings,
        "calibration": windows.label() if windows is not None else None,
        "quantizer_spec": spec.to_dict(),  # with calibration_spec, lets exports rebuild the same model
        "calibration_spec": calibration.to_dict() if windows is not None else None,
        **llamacpp,
    }
    if save_to:
        config["saved_to"] = str(save_quantized(quantized, save_to, tokenizer=loaded.tokenizer))
    return store_compressed(store, loaded, quantized.model, "quantization", config, metrics, evaluation,
                            timer.seconds, progress)


# ---------------------------------------------------------------- dropping


def _size_metrics(loaded: LoadedModel, model: torch.nn.Module, params: int) -> dict:
    """Size of a model with real parameters removed or added, against dense (16-bit bytes)."""
    dense = model_size(loaded.model)["params"]
    return {"params": params, "param_fraction": params / dense, "bytes": model_size(model)["bytes"],
            "bytes_16bit": 2 * params, "size_fraction": params / dense}


@explain_out_of_memory("The dropping run")
def run_dropping(store: ResultsStore, loaded: LoadedModel, plan: DropPlan, calibration: DataSpec,
                 evaluation: EvalPlan, *, layers: list[int] | None = None, save_to: str | Path | None = None,
                 progress: StageProgress | None = None) -> RunOutcome:
    """Drop layers or blocks from a copy, evaluate, store (and save if ``save_to``).

    ``layers``: the ones the user previewed (chosen from ``plan`` if None).
    """
    check_memory(run_memory_plan(loaded, "dropping", calibration, evaluation))
    if layers is None:
        layers = dropped_layers(store, loaded, plan, calibration, progress)
    windows = token_windows(evaluation.data, loaded.tokenizer, loaded.max_seqlen)
    with Timer() as timer:
        dropped = drop_model(loaded, plan.block, layers, plan.protect_ends)
    size = _size_metrics(loaded, dropped.model, dropped.report.params_dropped)
    latency = compare_latency(loaded.model, dropped.model, windows.input_ids[:1], repeats=3)
    size.update({f"latency_{k}": v for k, v in latency.items()})
    config = {"series": plan.series(), "block": plan.block, "by": plan.by, "count": len(layers),
              "layers": layers, "protect_ends": plan.protect_ends, "choice": plan.choice(),
              "iterative": plan.is_iterative,
              "calibration": calibration.label() if plan.by != "custom" else None}
    if save_to:
        config["saved_to"] = str(save_dropped(dropped, save_to, tokenizer=loaded.tokenizer))
    return store_compressed(store, loaded, dropped.model, "dropping", config, size, evaluation, timer.seconds,
                            progress)


# ---------------------------------------------------------------- stacking


@explain_out_of_memory("The stacked run")
def run_stacked(store: ResultsStore, loaded: LoadedModel, first: SlicingPlan | DropPlan, then: QuantPlan,
                calibration: DataSpec, evaluation: EvalPlan, *,
                progress: StageProgress | None = None) -> RunOutcome:
    """Compress twice: slice or drop, then quantize the result (every stage's plan is stored in the record).

    The second stage sees the first stage's model as its base (its own fingerprint, so quantization caches
    never mix); sizes are against the *dense* model at 16 bits.
    """
    if not isinstance(then, QuantPlan):
        raise ValueError("Stacking ends with quantization: slice or drop first, then quantize.")
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    with Timer() as timer:
        if isinstance(first, SlicingPlan):
            schedule = slicing_schedule(store, loaded, first, calibration, progress)
            stage = slice_model(loaded, schedule, windows, round_to=first.round_to,
                                final_rotation=first.final_rotation, progress=stage_callback(progress, "slicing"))
            stage_config = {"method": "slicing", "series": first.series(), "target": first.target,
                            "schedule": first.schedule, "dims": stage.dims}
        elif isinstance(first, DropPlan):
            layers = dropped_layers(store, loaded, first, calibration, progress)
            stage = drop_model(loaded, first.block, layers, first.protect_ends)
            stage_config = {"method": "dropping", "series": first.series(), "block": first.block, "layers": layers}
        else:
            raise ValueError("The first stage of a stack is slicing or dropping.")
        middle = LoadedModel.from_model(stage.model, loaded.tokenizer,
                                        source=f"{loaded.source} ({stage_config['series']})")
        # slicing keeps every layer (ranked by the dense model's scores); a dropped model is scored anew
        ranked_on = loaded if isinstance(first, SlicingPlan) else middle
        allocation, _ = allocation_for(store, ranked_on, then, calibration, progress)
        quantized = quantize_model(middle, allocation, windows if then.quantizer == "gptq" else None,
                                   spec=then.spec(), use_cache=False, progress=stage_callback(progress, "quantizing"))
    qsize = quantized.size()
    dense_params = model_size(loaded.model)["params"]
    size = {"params": model_size(middle.model)["params"], "bytes": qsize.total_bytes,
            "bytes_16bit": qsize.total_bytes_16bit, "size_fraction": qsize.total_bytes_16bit / (2 * dense_params),
            "param_fraction": model_size(middle.model)["params"] / dense_params,
            "avg_bits": allocation.average_bits, "bits_per_weight": qsize.bits_per_weight}
    quant_config = {"method": "quantization", "series": then.series(), "bits": list(allocation.bits),
                    "quantizer": then.quantizer, "group_size": then.group_size, "ordering": then.ordering,
                    "ranked_on": "dense model" if ranked_on is loaded else "dropped model"}
    config = {"series": f"{stage_config['series']} + {then.series()}", "stages": [stage_config, quant_config],
              "calibration": windows.label()}
    return store_compressed(store, loaded, quantized.model, "stacked", config, size, evaluation, timer.seconds,
                            progress)
