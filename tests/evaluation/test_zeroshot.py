"""Offline zero-shot tasks and lm-eval on the in-memory model."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.core.data import wiki_offline_split
from engine.evaluation.tasks import CONTINUATION_TASK, LASTWORD_TASK, build_offline_tasks
from engine.evaluation.zeroshot import (
    TaskUnavailableError,
    _datasets_offline_unless_reachable,
    _task_manager,
    zero_shot,
)


def _rows(folder, task):
    return [json.loads(line) for line in (folder / f"{task}.jsonl").read_text().splitlines()]


def test_offline_tasks_are_deterministic_and_disjoint_from_calibration(tmp_path):
    first, second = build_offline_tasks(tmp_path / "a"), build_offline_tasks(tmp_path / "b")
    calibration_titles = {title for title, _ in wiki_offline_split("calibration")}
    calibration_text = "\n".join(text for _, text in wiki_offline_split("calibration"))
    for task in (CONTINUATION_TASK, LASTWORD_TASK):
        assert (first / f"{task}.jsonl").read_text() == (second / f"{task}.jsonl").read_text()
        rows = _rows(first, task)
        assert len(rows) >= 200
        assert not {row["article"] for row in rows} & calibration_titles
        assert not any(row["context"] in calibration_text for row in rows[:50])
    for row in _rows(first, CONTINUATION_TASK)[:50]:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
    assert "dataset_path: json" in (first / f"{CONTINUATION_TASK}.yaml").read_text()


def test_offline_switch_reaches_the_already_imported_hub_clients(monkeypatch):
    """``datasets`` reads HF_HUB_OFFLINE at import: without its module flag a missing dataset retried the hub
    for ~25 s before failing."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("engine.evaluation.zeroshot.hub_reachable", lambda: False)
    before = (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE)
    with _datasets_offline_unless_reachable():
        assert datasets.config.HF_HUB_OFFLINE and huggingface_hub.constants.HF_HUB_OFFLINE
    assert (datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE) == before


def test_overlapping_evaluations_restore_the_switch_when_the_last_one_leaves(monkeypatch):
    """Two sessions evaluating at once: the second must not save the first's 'offline' and restore it last."""
    import os

    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("engine.evaluation.zeroshot.hub_reachable", lambda: "HF_HUB_OFFLINE" not in os.environ)
    before = huggingface_hub.constants.HF_HUB_OFFLINE
    first, second = _datasets_offline_unless_reachable(), _datasets_offline_unless_reachable()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # the second is still evaluating
    second.__exit__(None, None, None)
    assert huggingface_hub.constants.HF_HUB_OFFLINE == before and "HF_HUB_OFFLINE" not in os.environ


def test_offline_tasks_alone_skip_lm_evals_own_task_index():
    folder = str(build_offline_tasks())
    offline = _task_manager(folder, include_defaults=False)
    assert set(offline.all_tasks) >= {CONTINUATION_TASK, LASTWORD_TASK} and "piqa" not in offline.all_tasks
    assert _task_manager(folder, include_defaults=False) is offline  # built once per process


@pytest.mark.slow
def test_lm_eval_offline_on_builtin_and_damage_lowers_accuracy(builtin):
    calls = []
    (dense,) = zero_shot(builtin.model, builtin.tokenizer, [LASTWORD_TASK], limit=16,
                         progress=lambda done, total: calls.append((done, total)))
    assert dense.task == LASTWORD_TASK and dense.metric == "acc" and dense.n == 16
    assert dense.value >= 0.2 and dense.stderr is not None
    assert calls and calls[-1][0] == calls[-1][1]
    damaged = copy.deepcopy(builtin.model)
    with torch.no_grad():
        for layer in builtin.architecture.decoder_layers(damaged):
            layer.mlp.down_proj.weight.normal_(0, 0.5)
    (broken,) = zero_shot(damaged, builtin.tokenizer, [LASTWORD_TASK], limit=16)
    assert broken.value < dense.value - 0.15


@pytest.mark.slow  # loads the built-in model
def test_standard_task_offline_names_the_offline_task(builtin):
    with pytest.raises(TaskUnavailableError, match=CONTINUATION_TASK):
        zero_shot(builtin.model, builtin.tokenizer, ["piqa"], limit=2)


def test_unknown_task_is_refused(builtin):
    with pytest.raises(TaskUnavailableError, match="Unknown task"):
        zero_shot(builtin.model, builtin.tokenizer, ["not_a_task"])
