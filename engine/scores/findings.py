"""'What this says' sentences written from the numbers (never by hand) for the analysis pages."""

from __future__ import annotations

import math

from engine.scores.outliers import WeightOutliers
from engine.scores.ranking import spearman, zd_importance
from engine.scores.redundancy import LayerRedundancy


def has_sublayer_cosines(scores: LayerRedundancy) -> bool:
    """Whether every layer has finite attention and MLP cosines (not NaN: the architecture has no usable split)."""
    values = list(scores.attn_cos) + list(scores.mlp_cos)
    return bool(values) and all(math.isfinite(v) for v in values)


def most_redundant(scores: LayerRedundancy, k: int = 5) -> list[int]:
    """The ``k`` layers with the highest LR (most redundant first)."""
    return sorted(range(len(scores.lr)), key=lambda i: -scores.lr[i])[:k]


def redundancy_findings(scores: LayerRedundancy, outliers: WeightOutliers | None = None, k: int = 5) -> list[str]:
    """Short findings: candidate layers to slice or drop, layers that rewrite the stream, LIM/ZD agreement."""
    lr = scores.lr
    top = most_redundant(scores, k)
    lowest = sorted(range(len(lr)), key=lambda i: lr[i])[:3]
    typical = sorted(lr)[len(lr) // 2]
    lines = [
        "Most redundant layers (highest LR, the first candidates to slice harder or drop): "
        + ", ".join(f"{i} ({lr[i]:.3f})" for i in top) + ".",
        "Layers that change the residual stream most (protect them): "
        + ", ".join(f"{i} ({lr[i]:.3f})" for i in lowest) + f"; the median layer has LR {typical:.3f}.",
    ]
    spread = max(lr[i] for i in top) - min(v for v in lr if v >= sorted(lr)[len(lr) // 4])
    if spread < 0.05:
        lines.append(f"Most layers lie within {spread:.3f} of each other: LR separates them only weakly, "
                     "so check the ordering against measured damage before trusting it.")
    if has_sublayer_cosines(scores):  # no sentence about attention vs MLP where the model has no such split
        attention_more = sum(a > m for a, m in zip(scores.attn_cos, scores.mlp_cos))
        lines.append(f"The attention block changes the stream less than the MLP block in {attention_more} of "
                     f"{len(lr)} layers (higher cosine = smaller change).")
    if outliers is not None:
        rho = spearman(scores.lim, zd_importance(outliers.zd_layer))
        meaning = ("they rank layers almost independently, so an allocation by one says little about the other"
                   if abs(rho) < 0.3 else "they broadly agree on which layers matter" if rho > 0
                   else "they rank layers in roughly opposite orders")
        lines.append(f"LIM and ZD importance: Spearman ρ = {rho:.2f} — {meaning}.")
    return lines
