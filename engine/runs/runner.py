"""Runs: plan -> schedule / allocation -> compressed copy -> evaluation -> one stored record.

One runner for every method (:func:`run`; the method comes from the registry in :mod:`engine.methods`).
Pages and the CLI call only these functions.  Every run evaluates
perplexity on ``evaluation`` (and optional zero-shot tasks), adds size metrics
and the change against the dense model measured on the *same* windows
(measured once and reused), and writes exactly one record at the very end, so
an interrupted run leaves nothing behind.  Progress goes to
``progress(stage, done, total)``.  The shared base model is never modified:
every compression works on a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.memory import MemoryPlan, ModelShape, evaluation_batch
from engine.core.models import LoadedModel, dense_size_metrics
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.paths import cache_root, unused_folder
from engine.core.progress import StageProgress, Timer, stage_callback
from engine.evaluation.divergence import (
    DenseReference,
    DivergenceMeter,
    cached_reference,
    divergence_seconds_per_position,
    remember,
)
from engine.evaluation.latency import compare_latency, describe_seconds, estimate_seconds
from engine.evaluation.paired import paired_change
from engine.evaluation.perplexity import perplexity
from engine.evaluation.zeroshot import TaskUnavailableError, zero_shot
from engine.methods import method_for
from engine.quant.allocation import Allocation
from engine.runs.cached_scores import ScoresNotComputed
from engine.runs.memory_check import check_memory, run_memory_plan
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan, StackPlan
from engine.runs.record import CHANGE, CHANGE_HIGH, CHANGE_LOW, PPL, WINDOW_NLL, RunRecord, task_metrics
from engine.runs.store import ResultsStore
from engine.slicing.schedules import SlicingSchedule


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


LATENCY_REPEATS = 3
"""Timed forward passes per model when a method changes shapes (after one warm-up)."""


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


# ---------------------------------------------------------------- any method


def run_memory(loaded: LoadedModel, plan, calibration: DataSpec, evaluation: EvalPlan,
               prepared=None) -> MemoryPlan:
    """The memory plan of running ``plan`` (``prepared``: its previewed schedule / allocation / layers)."""
    method = method_for(plan)
    return run_memory_plan(loaded, method.memory_profile(plan), calibration, evaluation, method.group_size(plan),
                           method.code_bits(plan, prepared), reads_calibration=method.reads_calibration(plan))


def run(store: ResultsStore, loaded: LoadedModel, plan, calibration: DataSpec, evaluation: EvalPlan, *,
        prepared=None, save_to: str | Path | None = None, progress: StageProgress | None = None) -> RunOutcome:
    """Compress a copy as ``plan`` says (its method from the registry), evaluate it against dense on the same
    windows, store it (and save it if ``save_to``).

    ``prepared``: the schedule / allocation / layers the user previewed (computed from ``plan`` if None).
    Refusals (the model cannot do it, it would not fit in memory) come before any work, as ``ValueError``.
    """
    method = method_for(plan)

    @explain_out_of_memory(f"The {method.title} run")
    def _run() -> RunOutcome:
        refusal = method.refusal(loaded, plan, saving=bool(save_to))
        if refusal:
            raise ValueError(refusal)
        check_memory(run_memory(loaded, plan, calibration, evaluation, prepared))
        chosen = prepared if prepared is not None else method.prepare(store, loaded, plan, calibration, progress)
        with Timer() as timer:
            compressed = method.compress(store, loaded, plan, chosen, calibration, progress)
        size = dict(compressed.size)
        if method.measures_latency:  # on a window of the text the method read (calibration, else evaluation)
            windows = token_windows(calibration if method.reads_calibration(plan) else evaluation.data,
                                    loaded.tokenizer, loaded.max_seqlen)
            latency = compare_latency(loaded.model, compressed.model, windows.input_ids[:1], repeats=LATENCY_REPEATS)
            size.update({f"latency_{k}": v for k, v in latency.items()})
        config = dict(compressed.config)
        config["runs_in"] = method.runs_in(config)  # where the model runs as it is, for the table and the report
        if save_to:
            config["saved_to"] = str(method.save(compressed, save_to, loaded.tokenizer))
        return store_compressed(store, loaded, compressed.model, method.name, config, size, evaluation,
                                timer.seconds, progress)

    return _run()


def default_save_folder(loaded: LoadedModel, plan) -> Path:
    """A new folder under ``cache/<method folder>/`` named after the model and plan (never an existing one)."""
    return unused_folder(cache_root() / method_for(plan).folder / f"{loaded.fingerprint}-{plan.name()}")


def run_slicing(store: ResultsStore, loaded: LoadedModel, plan: SlicingPlan, calibration: DataSpec,
                evaluation: EvalPlan, *, schedule: SlicingSchedule | None = None, save_to: str | Path | None = None,
                progress: StageProgress | None = None) -> RunOutcome:
    """:func:`run` for a slicing plan (``schedule``: the one the user previewed)."""
    return run(store, loaded, plan, calibration, evaluation, prepared=schedule, save_to=save_to, progress=progress)


def run_quantization(store: ResultsStore, loaded: LoadedModel, plan: QuantPlan, calibration: DataSpec,
                     evaluation: EvalPlan, *, allocation: Allocation | None = None,
                     save_to: str | Path | None = None, progress: StageProgress | None = None) -> RunOutcome:
    """:func:`run` for a quantization plan (``allocation``: the bit map the user previewed)."""
    return run(store, loaded, plan, calibration, evaluation, prepared=allocation, save_to=save_to, progress=progress)


def run_dropping(store: ResultsStore, loaded: LoadedModel, plan: DropPlan, calibration: DataSpec,
                 evaluation: EvalPlan, *, layers: list[int] | None = None, save_to: str | Path | None = None,
                 progress: StageProgress | None = None) -> RunOutcome:
    """:func:`run` for a dropping plan (``layers``: the ones the user previewed)."""
    return run(store, loaded, plan, calibration, evaluation, prepared=layers, save_to=save_to, progress=progress)


def run_stacked(store: ResultsStore, loaded: LoadedModel, first: SlicingPlan | DropPlan, then: QuantPlan,
                calibration: DataSpec, evaluation: EvalPlan, *,
                progress: StageProgress | None = None) -> RunOutcome:
    """:func:`run` for a stack: slice or drop, then quantize the result."""
    return run(store, loaded, StackPlan(first, then), calibration, evaluation, progress=progress)


# ---------------------------------------------------------------- estimates


def estimate_run_seconds(loaded: LoadedModel, plan, calibration: DataSpec, evaluation: EvalPlan,
                         store: ResultsStore | None = None, dense_needed: bool | None = None) -> float:
    """Rough wall time (s) of one run of ``plan``: compression, plus dense and compressed evaluation.

    Run time = (passes · calibration tokens + fixed · hidden size) · decoder share / forward throughput, with the
    method's :class:`~engine.methods.base.RunCost` (calibration passes and per-layer work run the decoder
    layers, not the output head: :func:`decoder_share`), a scoring pass when the scores the run ranks by are not
    cached (``store`` given), plus the compressed model's evaluation and, while dense
    is not stored on these windows (or as ``dense_needed`` says), dense's (:func:`evaluation_seconds`).
    ``bench/estimates.py`` compares it with measured runs.
    """
    method = method_for(plan)
    cost = method.cost(plan)
    calib = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen).input_ids.numel()
    seconds = 0.0
    if store is not None:  # scores the run would compute first (not cached on these calibration windows)
        try:
            method.prepare(store, loaded, plan, calibration, compute=False)
        except ScoresNotComputed:
            seconds += scoring_seconds(loaded, calibration)
        except ValueError:  # the run itself will say what is wrong with the plan
            pass
    if dense_needed is None:
        dense_needed = store is None or find_dense(store, loaded, evaluation) is None
    fixed = cost.fixed_per_hidden * loaded.hidden_size  # per-layer work: decoder layers, not the head
    passes = cost.passes - (method.cached_passes(store, loaded, plan, calibration) if store is not None else 0.0)
    seconds += estimate_seconds(loaded.model, (passes * calib + fixed) * decoder_share(loaded))
    seconds += evaluation_seconds(loaded, evaluation.data, dense=False)
    windows = token_windows(evaluation.data, loaded.tokenizer, loaded.max_seqlen)
    seconds += method.extra_eval_seconds(loaded, plan, windows.seqlen, windows.n_windows)
    if method.measures_latency:  # dense and the compressed model timed on one window, each with a warm-up pass
        spec = calibration if method.reads_calibration(plan) else evaluation.data
        window = token_windows(spec, loaded.tokenizer, loaded.max_seqlen).seqlen
        seconds += estimate_seconds(loaded.model, window, forward_passes=2 * (1 + LATENCY_REPEATS))
    if dense_needed:
        seconds += evaluation_seconds(loaded, evaluation.data, dense=True)
    return seconds


def run_estimate(loaded: LoadedModel, plan, calibration: DataSpec, evaluation: EvalPlan,
                 store: ResultsStore | None = None) -> str:
    """:func:`estimate_run_seconds` as button text, e.g. ``"≈ 40 s"``."""
    seconds = estimate_run_seconds(loaded, plan, calibration, evaluation, store)
    return describe_seconds(seconds) + (" + zero-shot tasks" if evaluation.tasks else "")


def sweep_estimate(loaded: LoadedModel, plans, calibration: DataSpec, evaluation: EvalPlan,
                   store: ResultsStore | None = None) -> str:
    """Button text for running ``plans`` one after another (dense counted once, if it is not stored yet)."""
    plans = [getattr(p, "plan", p) for p in plans]  # matched-size points carry their plan
    dense = store is None or find_dense(store, loaded, evaluation) is None
    seconds = sum(estimate_run_seconds(loaded, p, calibration, evaluation, dense_needed=False) for p in plans)
    if dense and plans:
        seconds += evaluation_seconds(loaded, evaluation.data)
    return describe_seconds(seconds) + (" + zero-shot tasks" if evaluation.tasks else "")


def evaluation_seconds(loaded: LoadedModel, spec: DataSpec, dense: bool = True) -> float:
    """Rough wall time (s) of one evaluation over ``spec``'s windows: the forward passes, plus recording dense's
    next-token reference (``dense``) or measuring KL divergence against it (a compressed model), both
    proportional to the vocabulary (:func:`~engine.evaluation.divergence.divergence_seconds_per_position`)."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    record, measure = divergence_seconds_per_position(loaded.model.config.vocab_size, loaded.device)
    positions = windows.n_windows * (windows.seqlen - 1)
    return estimate_seconds(loaded.model, windows.input_ids.numel()) + positions * (record if dense else measure)


def decoder_share(loaded: LoadedModel) -> float:
    """The share of a forward pass spent in the decoder layers rather than the output head, by parameters
    (0.79 on SmolLM2-135M; 0.37 on Gemma-3-270M, whose head has 262,144 rows): what a pass that stops before the
    head (scoring, calibration) costs of a measured full forward."""
    head = loaded.model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None and getattr(head, "weight", None) is not None else 0
    layers = loaded.architecture.decoder_layers(loaded.model)
    decoder = sum(p.numel() for layer in layers for p in layer.parameters())
    return decoder / (decoder + head_params) if decoder + head_params else 1.0


def scoring_seconds(loaded: LoadedModel, spec: DataSpec) -> float:
    """Rough wall time (s) of one LR scoring pass over ``spec``'s windows (the decoder layers only)."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    return estimate_seconds(loaded.model, windows.input_ids.numel()) * decoder_share(loaded)


def scoring_estimate(loaded: LoadedModel, spec: DataSpec) -> str:
    """:func:`scoring_seconds` as button text."""
    return describe_seconds(scoring_seconds(loaded, spec))
