"""Zero-shot accuracy with lm-eval on the in-memory (possibly compressed) model.

``zero_shot`` wraps the model object in lm-eval's ``HFLM`` (no save/reload),
runs ``simple_evaluate`` 0-shot, and returns one :class:`TaskScore` per task
with the metric SliceGPT reports (``acc_norm``; ``acc`` for winogrande and
the last-word task), its standard error and the number of items.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch

from engine.core.models import hub_reachable
from engine.core.progress import ProgressFn
from engine.evaluation.tasks import CONTINUATION_TASK, LASTWORD_TASK, OFFLINE_TASKS, build_offline_tasks

STANDARD_TASKS = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu")
REPORTED_METRIC = {"winogrande": "acc", LASTWORD_TASK: "acc", "mmlu": "acc"}


class TaskUnavailableError(ValueError):
    """A standard task's dataset is neither cached nor reachable."""


@dataclass(frozen=True)
class TaskScore:
    """Accuracy of one task: metric name, value in [0, 1], standard error, items."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n: int

    def to_dict(self) -> dict:
        return asdict(self)


_OFFLINE_ENV = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
_offline_lock = threading.Lock()
_offline_users = 0  # evaluations inside the switch right now (two sessions may evaluate at once)
_offline_saved: tuple[dict, list] | None = None


def _offline_flags() -> list[tuple[object, str]]:
    import datasets.config
    import huggingface_hub.constants

    return [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE")]


@contextlib.contextmanager
def _datasets_offline_unless_reachable() -> Iterator[None]:
    """Make ``datasets`` fail fast instead of retrying a hub it cannot reach.

    ``datasets`` and ``huggingface_hub`` read the offline switch from the environment once, at import, so the
    environment variables alone would come too late: their module flags are set too.  The switch is
    process-wide: the first evaluation to enter saves the old values, the last to leave restores them (a lock
    and a count), so two sessions evaluating at once cannot leave the process offline.
    """
    global _offline_users, _offline_saved
    with _offline_lock:
        if _offline_users == 0 and hub_reachable():
            entered = False
        else:
            entered = True
            if _offline_users == 0:
                flags = _offline_flags()
                _offline_saved = ({k: os.environ.get(k) for k in _OFFLINE_ENV},
                                  [getattr(module, name) for module, name in flags])
                os.environ.update({k: "1" for k in _OFFLINE_ENV})
                for module, name in flags:
                    setattr(module, name, True)
            _offline_users += 1
    try:
        yield
    finally:
        if entered:
            with _offline_lock:
                _offline_users -= 1
                if _offline_users == 0 and _offline_saved is not None:
                    saved_env, saved_flags = _offline_saved
                    for key, value in saved_env.items():
                        if value is None:
                            os.environ.pop(key, None)
                        else:
                            os.environ[key] = value
                    for (module, name), value in zip(_offline_flags(), saved_flags):
                        setattr(module, name, value)
                    _offline_saved = None


def _progress_lm(model: torch.nn.Module, tokenizer, batch_size: int, progress: ProgressFn | None):
    """An ``HFLM`` around the model object that reports (done, total) requests."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            total, done = len(requests), 0
            results = []
            chunk = max(batch_size * 8, 1)
            for start in range(0, total, chunk):
                results.extend(super().loglikelihood(requests[start : start + chunk], disable_tqdm=True))
                done = min(start + chunk, total)
                if progress is not None:
                    progress(done, total)
            return results

    return ProgressHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                        device=str(next(model.parameters()).device))


def _task_score(task: str, metrics: dict, n: int) -> TaskScore:
    metric = REPORTED_METRIC.get(task, "acc_norm")
    if f"{metric},none" not in metrics:
        metric = "acc"
    stderr = metrics.get(f"{metric}_stderr,none")
    stderr = float(stderr) if isinstance(stderr, (int, float)) and math.isfinite(stderr) else None
    return TaskScore(task, metric, float(metrics[f"{metric},none"]), stderr, n)


@functools.lru_cache(maxsize=2)
def _task_manager(offline_folder: str, include_defaults: bool):
    """lm-eval's task index over the offline tasks, and over its own tasks only when ``include_defaults`` (its
    thousands of YAML files take ~15 s to read): built once per process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=offline_folder, include_defaults=include_defaults)


def zero_shot(
    model: torch.nn.Module,
    tokenizer,
    tasks: list[str] = (CONTINUATION_TASK,),
    limit: int | None = None,
    batch_size: int = 8,
    progress: ProgressFn | None = None,
) -> list[TaskScore]:
    """0-shot accuracy of ``model`` on ``tasks`` (offline or standard lm-eval tasks)."""
    import lm_eval

    unknown = [t for t in tasks if t not in OFFLINE_TASKS + STANDARD_TASKS]
    if unknown:
        raise TaskUnavailableError(
            f"Unknown task(s): {', '.join(unknown)}. Choose from {', '.join(OFFLINE_TASKS + STANDARD_TASKS)}."
        )
    manager = _task_manager(str(build_offline_tasks()), include_defaults=not set(tasks) <= set(OFFLINE_TASKS))
    lm = _progress_lm(model, tokenizer, batch_size, progress)
    try:
        with _datasets_offline_unless_reachable():
            output = lm_eval.simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=0, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=1000, verbosity="ERROR",
            )
    except Exception as err:  # lm-eval/datasets raise many types for a missing dataset
        if set(tasks) <= set(OFFLINE_TASKS):
            raise
        raise TaskUnavailableError(
            f"Could not load the data of {', '.join(t for t in tasks if t not in OFFLINE_TASKS)}: "
            f"it is not cached and the Hugging Face hub cannot be reached ({type(err).__name__}). "
            f"Use the offline task '{CONTINUATION_TASK}' (or '{LASTWORD_TASK}') instead."
        ) from err
    results, counts = output["results"], output.get("n-samples", {})
    return [_task_score(t, results[t], int(counts.get(t, {}).get("effective", 0))) for t in tasks if t in results]
