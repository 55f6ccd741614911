"""Layer scores cached in the store per model fingerprint, data, windows and seqlen.

The scoring math (``engine.scores``) knows nothing about the store; this
module adds the cache around it.
"""

from __future__ import annotations

import torch

from engine.core.architectures import Architecture
from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn
from engine.runs.store import ResultsStore, cache_key
from engine.scores.outliers import WeightOutliers, weight_outliers
from engine.scores.redundancy import LayerRedundancy, layer_redundancy

SCORES_VERSION = 2  # 2: outlier statistics carry module sizes


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
    key = cache_key(kind="layer_redundancy", version=SCORES_VERSION, fingerprint=fingerprint,
                    data=windows.spec.to_dict(), n_windows=windows.n_windows, seqlen=windows.seqlen)
    payload = store.get_cached(key)
    if payload is not None:
        return LayerRedundancy(**payload), True
    if not compute:
        return None, False
    scores = layer_redundancy(model, arch, windows, progress=progress)
    store.put_cached(key, "layer_redundancy", scores.to_dict())
    return scores, False


def cached_weight_outliers(
    store: ResultsStore, model: torch.nn.Module, arch: Architecture, fingerprint: str, k: float = 3.0
) -> tuple[WeightOutliers, bool]:
    """ZD statistics from the store when computed before for this model and k; (scores, hit)."""
    key = cache_key(kind="weight_outliers", version=SCORES_VERSION, fingerprint=fingerprint, k=k)
    payload = store.get_cached(key)
    if payload is not None:
        return WeightOutliers(**payload), True
    scores = weight_outliers(model, arch, k)
    store.put_cached(key, "weight_outliers", scores.to_dict())
    return scores, False
