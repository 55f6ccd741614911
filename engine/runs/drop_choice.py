"""Which layers a dropping plan removes: ranked on calibration text by scores or measured sensitivity, at
once or iteratively; cached in the store.

The pure choice (rankings, protected ends, the iterative loop) is
:mod:`engine.dropping.choose`; this module feeds it the loaded model's
scores (:mod:`engine.runs.cached_scores`) or the sensitivity lab's measured
KL (:mod:`engine.sensitivity.cached`), on the partly dropped model when the
choice is iterative.  Previews pass ``compute=False`` and get
:class:`~engine.runs.cached_scores.ScoresNotComputed` (with the computation
to run on a button) instead of waiting.
"""

from __future__ import annotations

from dataclasses import asdict

from engine.core.data import DataSpec, token_windows
from engine.core.keys import StoredKind
from engine.core.models import LoadedModel
from engine.core.progress import StageProgress
from engine.dropping.choose import (
    SENSITIVITY_ACTIONS,
    check_drop,
    choose_iteratively,
    choose_layers,
    droppable,
    ranking_scores,
    sensitivity_ranking,
    top_ranked,
)
from engine.dropping.drop_model import drop_model
from engine.evaluation.latency import describe_seconds, estimate_seconds
from engine.runs.cached_scores import ScoresNotComputed, scores_for
from engine.runs.plans import DropPlan
from engine.runs.store import ResultsStore
from engine.sensitivity.actions import Action, check_supported
from engine.sensitivity.cached import measure_sensitivity, sensitivity_if_cached

ITERATIVE_DROP = StoredKind("iterative_drop")
"""Layers chosen iteratively, per model, plan and calibration windows (a preview must not redo the drops)."""


def dropped_layers(store: ResultsStore, loaded: LoadedModel, plan: DropPlan, calibration: DataSpec,
                   progress: StageProgress | None = None, compute: bool = True) -> list[int]:
    """The layers whose ``plan.block`` goes, ranked on ``calibration`` at once or iteratively (``plan.choice()``).

    ``compute=False`` (previews): raise :class:`ScoresNotComputed` (with the computation to run on a button)
    instead of scoring or measuring.
    """
    if plan.by == "custom":
        layers = choose_layers(None, loaded.num_layers, plan.count, "custom", plan.protect_ends, plan.custom)
    else:
        candidates = droppable(loaded.num_layers, plan.count, plan.protect_ends)
        if plan.by == "sensitivity":
            check_supported(Action(SENSITIVITY_ACTIONS[plan.block]), loaded.architecture, loaded.hidden_size)

        def rank(dropped: list[int]) -> list[float]:
            try:
                return _drop_ranking(store, loaded, plan, calibration, dropped, compute, progress)
            except ScoresNotComputed as missing:
                if plan.by != "sensitivity" and not plan.is_iterative:
                    raise  # the dense model's LR scores: the usual prompt
                steps = plan.count if plan.is_iterative else 1
                raise ScoresNotComputed(
                    str(missing), what=f"{plan.by} ranking" + (f" ({steps} re-rankings)" if steps > 1 else ""),
                    compute=lambda p: dropped_layers(store, loaded, plan, calibration, p, compute=True),
                    estimate=_ranking_estimate(loaded, plan, calibration)) from None

        if plan.is_iterative:  # cached: a preview must not re-copy the model once per step on every rerun
            key = ITERATIVE_DROP.key(fingerprint=loaded.fingerprint, plan=asdict(plan),
                                     data=token_windows(calibration, loaded.tokenizer, loaded.max_seqlen).key())
            found = ITERATIVE_DROP.get(store, key)
            if found is not None:
                layers = found["layers"]
            else:
                layers = choose_iteratively(rank, loaded.num_layers, plan.count, plan.protect_ends)
                ITERATIVE_DROP.put(store, key, {"layers": layers})
        else:
            layers = top_ranked(rank([]), candidates, plan.count)
    check_drop(loaded.num_layers, plan.block, layers, plan.protect_ends)
    return layers


def _drop_ranking(store: ResultsStore, loaded: LoadedModel, plan: DropPlan, calibration: DataSpec,
                  dropped: list[int], compute: bool, progress: StageProgress | None) -> list[float]:
    """One value per dense layer (higher = drop first) for ``plan.by``, on the model without ``dropped``."""
    model, kept_layers = loaded, list(range(loaded.num_layers))
    if dropped:
        stage = drop_model(loaded, plan.block, dropped)
        model = LoadedModel.from_model(stage.model, loaded.tokenizer, source=f"{loaded.source} minus {dropped}")
        if plan.block == "layer":
            kept_layers = [i for i in kept_layers if i not in dropped]
    if plan.by == "sensitivity":
        actions = [Action(SENSITIVITY_ACTIONS[plan.block])]
        matrix = (measure_sensitivity(store, model, calibration, actions, progress=progress) if compute
                  else sensitivity_if_cached(store, model, calibration, actions))
        if matrix is None:
            raise ScoresNotComputed(f"The {actions[0].label} sensitivity on {calibration.label()} is not measured "
                                    "yet.")
        values = sensitivity_ranking(matrix.damages[0].kl)
    else:
        scores, _zd = scores_for(store, model, calibration, compute, progress)
        values = ranking_scores(scores, plan.by)
    dense_values = [float("-inf")] * loaded.num_layers
    for index, value in zip(kept_layers, values):
        dense_values[index] = value
    return dense_values


def measured_drop_kl(store: ResultsStore, loaded: LoadedModel, plan: DropPlan,
                     calibration: DataSpec) -> list[float] | None:
    """The dense model's measured KL (nats/token) of dropping each layer's ``plan.block`` alone, if cached."""
    matrix = sensitivity_if_cached(store, loaded, calibration, [Action(SENSITIVITY_ACTIONS[plan.block])])
    return None if matrix is None else list(matrix.damages[0].kl)


def _ranking_estimate(loaded: LoadedModel, plan: DropPlan, calibration: DataSpec) -> str:
    """Rough time to rank for ``plan`` (a sensitivity scan is ≈ 0.6 forward passes per layer)."""
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    passes = 0.6 * loaded.num_layers if plan.by == "sensitivity" else 1.0
    rankings = plan.count if plan.is_iterative else 1
    return describe_seconds(estimate_seconds(loaded.model, windows.input_ids.numel(), passes * rankings))
