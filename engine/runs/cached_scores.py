"""Layer scores cached in the store per model fingerprint, data, windows and seqlen.

The scoring math (``engine.scores``) knows nothing about the store; this
module adds the cache around it, and gives runs, optimizers and pages the
loaded model's scores on a data spec (:func:`compute_scores`, or only when
cached: :func:`scores_if_cached` / :class:`ScoresNotComputed`).
"""

from __future__ import annotations

import torch

from engine.core.architectures import Architecture
from engine.core.data import DataError, DataSpec, TokenWindows, token_windows
from engine.core.keys import StoredKind
from engine.core.models import LoadedModel
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.progress import ProgressFn, StageProgress, stage_callback
from engine.runs.store import ResultsStore
from engine.scores.outliers import WeightOutliers, weight_outliers
from engine.scores.redundancy import LayerRedundancy, layer_redundancy

SCORES_VERSION = 2  # 2: outlier statistics carry module sizes
LR_SCORES = StoredKind("layer_redundancy", SCORES_VERSION)
ZD_SCORES = StoredKind("weight_outliers", SCORES_VERSION)


def cached_layer_redundancy(
    store: ResultsStore,
    model: torch.nn.Module,
    arch: Architecture,
    fingerprint: str,
    windows: TokenWindows,
    progress: ProgressFn | None = None,
    compute: bool = True,
) -> tuple[LayerRedundancy | None, bool]:
    """LR scores from the store when these exact inputs were scored before; (scores, hit).

    ``compute=False`` only looks: ``(None, False)`` when nothing is cached.
    """
    key = LR_SCORES.key(fingerprint=fingerprint, data=windows.key(), n_windows=windows.n_windows,
                        seqlen=windows.seqlen)
    payload = LR_SCORES.get(store, key)
    if payload is not None:
        return LayerRedundancy(**payload), True
    if not compute:
        return None, False
    scores = layer_redundancy(model, arch, windows, progress=progress)
    LR_SCORES.put(store, key, scores.to_dict())
    return scores, False


def cached_weight_outliers(
    store: ResultsStore, model: torch.nn.Module, arch: Architecture, fingerprint: str, k: float = 3.0
) -> tuple[WeightOutliers, bool]:
    """ZD statistics from the store when computed before for this model and k; (scores, hit)."""
    key = ZD_SCORES.key(fingerprint=fingerprint, k=k)
    payload = ZD_SCORES.get(store, key)
    if payload is not None:
        return WeightOutliers(**payload), True
    scores = weight_outliers(model, arch, k)
    ZD_SCORES.put(store, key, scores.to_dict())
    return scores, False


# --- the loaded model's scores on a data spec --------------------------------------

@explain_out_of_memory("Computing the layer scores")
def compute_scores(store: ResultsStore, loaded: LoadedModel, spec: DataSpec, k: float = 3.0,
                   progress: StageProgress | None = None) -> tuple[LayerRedundancy, WeightOutliers, bool]:
    """LR (cached per model, data, windows, seqlen) and ZD scores; the bool says LR was cached."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    lr, hit = cached_layer_redundancy(store, loaded.model, loaded.architecture, loaded.fingerprint,
                                      windows, progress=stage_callback(progress, "scoring"))
    zd, _ = cached_weight_outliers(store, loaded.model, loaded.architecture, loaded.fingerprint, k)
    return lr, zd, hit


def scores_if_cached(store: ResultsStore, loaded: LoadedModel, spec: DataSpec,
                     k: float = 3.0) -> tuple[LayerRedundancy, WeightOutliers] | None:
    """The LR and ZD scores when LR for these windows is already cached, else None (nothing is computed)."""
    windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    lr, _hit = cached_layer_redundancy(store, loaded.model, loaded.architecture, loaded.fingerprint, windows,
                                       compute=False)
    if lr is None:
        return None
    zd, _ = cached_weight_outliers(store, loaded.model, loaded.architecture, loaded.fingerprint, k)
    return lr, zd


def lr_scores_cached(store: ResultsStore, loaded: LoadedModel, spec: DataSpec) -> bool:
    """Whether LR scores on ``spec``'s windows are stored (only looks; ``False`` when the windows cannot be cut)."""
    try:
        windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    except DataError:
        return False
    return cached_layer_redundancy(store, loaded.model, loaded.architecture, loaded.fingerprint, windows,
                                   compute=False)[0] is not None


class ScoresNotComputed(LookupError):
    """A preview needs measurements that are not cached yet (computed on a button).

    ``what``: what is missing, in words (for the prompt); ``compute(progress)``: computes and caches it
    (``None``: the LR scores on the calibration text); ``estimate``: rough time, in words.
    """

    def __init__(self, message: str, what: str = "LR scores", compute=None, estimate: str | None = None):
        super().__init__(message)
        self.what, self.compute, self.estimate = what, compute, estimate


def scores_for(store: ResultsStore, loaded: LoadedModel, calibration: DataSpec, compute: bool,
               progress: StageProgress | None = None) -> tuple[LayerRedundancy, WeightOutliers]:
    """LR and ZD scores: computed (and cached) when ``compute``, else from the cache or :class:`ScoresNotComputed`."""
    if compute:
        lr, zd, _hit = compute_scores(store, loaded, calibration, progress=progress)
        return lr, zd
    found = scores_if_cached(store, loaded, calibration)
    if found is None:
        raise ScoresNotComputed(f"LR scores on {calibration.label()} are not computed yet.")
    return found
