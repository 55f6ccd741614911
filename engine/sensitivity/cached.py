"""Sensitivity scans through the results store: per model fingerprint, data, windows, seqlen and action.

Pages and the CLI call only these functions.  Each action's scan is stored
as one cache entry when it has measured *every* layer (one transaction), so
a scan cancelled or failing mid-way stores nothing of the unfinished action;
actions finished before it stay stored and a rerun picks up from there.  The
dense reference pass is shared by the actions measured together.  The
agreement table (bootstrap) is cached the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.keys import PayloadCache, StoredKind
from engine.core.models import LoadedModel
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.progress import StageProgress
from engine.evaluation.latency import describe_seconds, estimate_seconds
from engine.scores.outliers import WeightOutliers
from engine.scores.redundancy import LayerRedundancy
from engine.sensitivity.actions import Action, check_supported
from engine.sensitivity.agreement import RESAMPLES, Agreement, agreement_table, check_sample, layer_scores
from engine.sensitivity.cost import action_forward_equivalents, dense_forward_equivalents, layer_costs
from engine.sensitivity.dense import dense_reference
from engine.sensitivity.errors import SensitivityError
from engine.sensitivity.scan import ActionDamage, StopCheck, scan_action

SENSITIVITY_VERSION = 1
DAMAGE = StoredKind("sensitivity", SENSITIVITY_VERSION)
AGREEMENT = StoredKind("sensitivity_agreement", SENSITIVITY_VERSION)


def calibration_windows(loaded: LoadedModel, spec: DataSpec) -> TokenWindows:
    """The calibration windows of ``spec``; refuses evaluation text and samples too small for an interval."""
    if spec.split != "calibration":
        raise SensitivityError("Sensitivity is measured on calibration text only (evaluation text stays unseen "
                               "for perplexity); choose the calibration split.")
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    check_sample(windows.n_windows)
    return windows


def check_actions(loaded: LoadedModel, actions: list[Action]) -> None:
    """Refuse an empty list and actions this model cannot do (before anything runs)."""
    if not actions:
        raise SensitivityError("Choose at least one action to measure (e.g. RTN 3-bit, slice 25%, drop layer).")
    for action in actions:
        check_supported(action, loaded.architecture, loaded.hidden_size)


def damage_key(loaded: LoadedModel, windows: TokenWindows, action: Action) -> str:
    return DAMAGE.key(fingerprint=loaded.fingerprint, data=windows.key(), n_windows=windows.n_windows,
                      seqlen=windows.seqlen, action=action.key)


@dataclass
class SensitivityMatrix:
    """Measured damage per action (in the order asked) × layer, and which actions came from the cache."""

    damages: list[ActionDamage]
    cached: list[bool]
    keys: list[str]

    @property
    def actions(self) -> list[Action]:
        return [d.spec for d in self.damages]

    @property
    def data_label(self) -> str:
        return self.damages[0].data_label

    def to_dict(self) -> dict:
        return {"actions": [d.spec.key for d in self.damages], "damages": [d.to_dict() for d in self.damages]}


def _found(store: PayloadCache, keys: list[str]) -> list[ActionDamage | None]:
    found = []
    for key in keys:
        payload = DAMAGE.get(store, key)
        found.append(None if payload is None else ActionDamage.from_dict(payload))
    return found


def sensitivity_if_cached(store: PayloadCache, loaded: LoadedModel, spec: DataSpec,
                          actions: list[Action]) -> SensitivityMatrix | None:
    """The matrix when every action was measured on these windows before, else None (nothing runs)."""
    windows = calibration_windows(loaded, spec)
    keys = [damage_key(loaded, windows, a) for a in actions]
    found = _found(store, keys)
    if not actions or any(d is None for d in found):
        return None
    return SensitivityMatrix(found, [True] * len(found), keys)


@explain_out_of_memory("The sensitivity scan")
def measure_sensitivity(
    store: PayloadCache,
    loaded: LoadedModel,
    spec: DataSpec,
    actions: list[Action],
    *,
    batch_size: int = 4,
    progress: StageProgress | None = None,
    should_stop: StopCheck | None = None,
) -> SensitivityMatrix:
    """Measured damage of every action on every layer: cached entries reused, missing ones scanned and stored.

    Raises a :class:`SensitivityError` subclass for bad input (before any
    computation) and :class:`~engine.sensitivity.errors.ScanCancelled` when
    ``should_stop`` fires; either way no partial action is stored.
    """
    check_actions(loaded, actions)
    windows = calibration_windows(loaded, spec)
    keys = [damage_key(loaded, windows, a) for a in actions]
    found = _found(store, keys)
    cached = [d is not None for d in found]
    missing = [i for i, d in enumerate(found) if d is None]
    if missing:
        dense = dense_reference(loaded.model, loaded.architecture, windows.input_ids, batch_size=batch_size,
                                progress=progress)
        for n, index in enumerate(missing, 1):
            step = None if progress is None else (
                lambda stage, done, total, n=n: progress(f"action {n}/{len(missing)}: {stage}", done, total))
            damage = scan_action(loaded.model, loaded.architecture, dense, actions[index], data_label=windows.label(),
                                 progress=step, should_stop=should_stop)
            DAMAGE.put(store, keys[index], damage.to_dict())
            found[index] = damage
        del dense
    return SensitivityMatrix(found, cached, keys)


@dataclass(frozen=True)
class ScanEstimate:
    """Cost of measuring the actions not cached yet: forward-equivalents over ``tokens`` and rough seconds."""

    forward_equivalents: float
    per_action: dict[str, float]
    tokens: int
    seconds: float
    cached: int

    def text(self) -> str:
        if not self.per_action:
            return "everything is cached"
        return (f"≈ {self.forward_equivalents:.0f} forward passes over {self.tokens:,} tokens, "
                f"{describe_seconds(self.seconds)}")


def scan_estimate(store: PayloadCache, loaded: LoadedModel, spec: DataSpec, actions: list[Action]) -> ScanEstimate:
    """What :func:`measure_sensitivity` would cost now (cached actions are free).

    Seconds come from the model's measured forward throughput (GPTQ's own
    column loop comes on top).
    """
    windows = calibration_windows(loaded, spec)
    costs = layer_costs(loaded.model, loaded.architecture)
    per_action = {a.key: action_forward_equivalents(costs, a) for a in actions
                  if DAMAGE.get(store, damage_key(loaded, windows, a)) is None}
    total = sum(per_action.values()) + (dense_forward_equivalents(costs) if per_action else 0.0)
    tokens = windows.input_ids.numel()
    seconds = estimate_seconds(loaded.model, tokens, total) if per_action else 0.0
    return ScanEstimate(total, per_action, tokens, seconds, len(actions) - len(per_action))


def cached_agreement(store: PayloadCache, loaded: LoadedModel, matrix: SensitivityMatrix, lr: LayerRedundancy,
                     outliers: WeightOutliers, top_k: int | None = None,
                     resamples: int = RESAMPLES) -> list[Agreement]:
    """The agreement table of ``matrix`` against the LR / ZD scores, cached per inputs (the bootstrap takes ~1 s)."""
    key = AGREEMENT.key(damages=matrix.keys, fingerprint=loaded.fingerprint, scores=lr.data_label,
                        n_windows=lr.n_windows, seqlen=lr.seqlen, k=outliers.k, top_k=top_k, resamples=resamples)
    payload = AGREEMENT.get(store, key)
    if payload is not None:
        return [Agreement.from_dict(row) for row in payload["rows"]]
    rows = agreement_table(layer_scores(lr, outliers), matrix.damages, top_k=top_k, resamples=resamples)
    AGREEMENT.put(store, key, {"rows": [r.to_dict() for r in rows]})
    return rows



def sensitivity_summary(loaded: LoadedModel, matrix: SensitivityMatrix, rows: list[Agreement], finding: str) -> dict:
    """JSON-ready result of a lab: model, data, per-layer KL / ΔNLL per action, the agreement table, the finding."""
    return {
        "model": loaded.source, "fingerprint": loaded.fingerprint, "data": matrix.data_label,
        "layers": matrix.damages[0].num_layers, "units": "nats per token",
        "actions": {d.spec.key: {"label": d.spec.label, "kl": d.kl, "delta_nll": d.delta_nll,
                                 "dense_nll": d.dense_nll, "forward_equivalents": d.forward_equivalents,
                                 "seconds": d.seconds, "cached": hit, "details": d.details}
                    for d, hit in zip(matrix.damages, matrix.cached)},
        "agreement": [r.to_dict() for r in rows],
        "finding": finding,
    }
