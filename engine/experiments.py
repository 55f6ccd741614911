"""Runs: compress a copy, evaluate it, store one row.  Shared by the pages and the CLI.

Every ``run_*`` function evaluates perplexity on ``eval_spec`` (and optional
zero-shot tasks), adds size metrics, and writes exactly one row to the store
at the very end, so an interrupted run leaves nothing behind.  Progress goes to
``progress(stage, done, total)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from engine.data import DataSpec, token_windows
from engine.evaluate import perplexity
from engine.models import LoadedModel, dense_size_metrics
from engine.scores import LayerRedundancy, WeightOutliers, cached_layer_redundancy, cached_weight_outliers
from engine.store import ResultsStore, Timer
from engine.zeroshot import zero_shot

StageProgress = Callable[[str, int, int], None]


def stage_callback(progress: StageProgress | None, name: str):
    """A ``(done, total)`` callback reporting to ``progress`` under the stage ``name``."""
    return None if progress is None else (lambda done, total: progress(name, done, total))


@dataclass(frozen=True)
class EvalPlan:
    """What to measure on every compressed model: perplexity data, zero-shot tasks."""

    data: DataSpec
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    batch_size: int = 4


@dataclass
class RunOutcome:
    """A stored run: its id, metrics, and the model that was evaluated."""

    run_id: int
    metrics: dict
    data: dict
    model: torch.nn.Module
    config: dict


def evaluate_model(
    loaded: LoadedModel, model: torch.nn.Module, plan: EvalPlan, progress: StageProgress | None = None
) -> tuple[dict, dict]:
    """(metrics, data) of ``model``: perplexity, its interval, and zero-shot accuracies."""
    windows = token_windows(plan.data, loaded.tokenizer, loaded.max_seqlen)
    result = perplexity(model, windows, batch_size=plan.batch_size, progress=stage_callback(progress, "perplexity"))
    metrics = result.to_metrics()
    if plan.tasks:
        for score in zero_shot(model, loaded.tokenizer, list(plan.tasks), limit=plan.task_limit,
                               progress=stage_callback(progress, "zero-shot")):
            metrics[f"acc.{score.task}"] = score.value
            metrics[f"acc_stderr.{score.task}"] = score.stderr
            metrics[f"acc_n.{score.task}"] = score.n
            metrics[f"acc_metric.{score.task}"] = score.metric
    data = {**plan.data.to_dict(), "n_windows": windows.n_windows, "label": windows.label()}
    if plan.tasks:
        data["tasks"] = list(plan.tasks)
        data["task_limit"] = plan.task_limit
    return metrics, data


def run_dense(
    store: ResultsStore, loaded: LoadedModel, plan: EvalPlan, progress: StageProgress | None = None
) -> RunOutcome:
    """Evaluate the uncompressed model and store it as method ``dense``."""
    with Timer() as timer:
        metrics, data = evaluate_model(loaded, loaded.model, plan, progress)
    metrics.update(dense_size_metrics(loaded.model))
    run_id = store.add_run(model=loaded.source, model_fingerprint=loaded.fingerprint, method="dense",
                           config={"series": "dense"}, data=data, metrics=metrics, duration_s=timer.seconds)
    return RunOutcome(run_id, metrics, data, loaded.model, {"series": "dense"})


def compute_scores(
    store: ResultsStore, loaded: LoadedModel, spec: DataSpec, k: float = 3.0,
    progress: StageProgress | None = None,
) -> tuple[LayerRedundancy, WeightOutliers, bool]:
    """LR (cached per model, data, windows, seqlen) and ZD scores; the bool says LR was cached."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    lr, hit = cached_layer_redundancy(store, loaded.model, loaded.architecture, loaded.fingerprint,
                                      windows, progress=stage_callback(progress, "scoring"))
    zd, _ = cached_weight_outliers(store, loaded.model, loaded.architecture, loaded.fingerprint, k)
    return lr, zd, hit


def store_compressed(
    store: ResultsStore, loaded: LoadedModel, model: torch.nn.Module, method: str, config: dict,
    size_metrics: dict, plan: EvalPlan, seconds: float, progress: StageProgress | None = None,
) -> RunOutcome:
    """Evaluate a compressed copy and store it with its settings and size."""
    with Timer() as timer:
        metrics, data = evaluate_model(loaded, model, plan, progress)
    metrics.update(size_metrics)
    metrics["compress_s"] = seconds
    run_id = store.add_run(model=loaded.source, model_fingerprint=loaded.fingerprint, method=method,
                           config=config, data=data, metrics=metrics, duration_s=seconds + timer.seconds)
    return RunOutcome(run_id, metrics, data, model, config)


def grid(*axes: Sequence) -> list[tuple]:
    """Cartesian product of the axes, in order (first axis slowest)."""
    points = [()]
    for axis in axes:
        points = [p + (v,) for p in points for v in axis]
    return points
