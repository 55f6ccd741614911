"""How well each layer score predicts each measured sensitivity (docs/methods.md §6).

Every score is turned into a *predicted cost* (higher = the score says this
layer should hurt more when touched), following its paper's reading:

==============  ==================  ===========================================
score           predicted cost      reading
==============  ==================  ===========================================
LR              −LR                 a redundant layer (high LR) should cost little
LIM             LIM = −LR           more input modification, more important
BI              1 − LR              ShortGPT's Block Influence
ZD              −ZD                 smaller ZD, more important
outliers |z|>k  count               more outlier weights, harder to quantize
attention cos   −cos                attention block changes the stream more
MLP cos         −cos                MLP block changes the stream more
==============  ==================  ===========================================

LR, LIM and BI rank the layers identically by definition, so they share one ρ
(``same_as = "LR"``); other scores that happen to rank alike keep their own rows.

``ρ`` is Spearman's rank correlation (:func:`engine.scores.ranking.spearman`)
between the predicted cost and the measured mean KL per layer: +1 = the score
orders the layers exactly by measured damage.  Its 95% interval comes from a
bootstrap over calibration windows: windows are resampled with replacement,
the per-layer damage is recomputed from per-window means, and ρ recomputed
(the scores are held at their values).  ``overlap``: share of the ``k`` layers
the score predicts most costly that are among the ``k`` most damaged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from engine.scores.outliers import WeightOutliers
from engine.scores.ranking import spearman
from engine.scores.redundancy import LayerRedundancy
from engine.sensitivity.errors import SampleTooSmallError, SensitivityError
from engine.sensitivity.scan import ActionDamage

MIN_WINDOWS = 4
"""Fewer calibration windows than this make a bootstrap interval meaningless (3 windows: 10 distinct resamples)."""
RESAMPLES = 1000

BACKWARDS_RHO = -0.3  # a score ranks the damage backwards only with ρ at or below this


@dataclass(frozen=True)
class LayerScore:
    """One score per layer: ``values`` as defined, ``predicted`` oriented so higher = should cost more."""

    name: str
    values: tuple[float, ...]
    predicted: tuple[float, ...]
    reading: str
    same_as: str | None = None  # a score with the same ranking by definition (LIM and BI rank like LR)


def layer_scores(lr: LayerRedundancy, outliers: WeightOutliers) -> list[LayerScore]:
    """LR, LIM, BI, ZD, |z| > k counts, attention-only and MLP-only cosines, as :class:`LayerScore` s."""
    k = f"{outliers.k:g}"
    return [
        LayerScore("LR", tuple(lr.lr), tuple(-v for v in lr.lr), "low LR = costly"),
        LayerScore("LIM", tuple(lr.lim), tuple(lr.lim), "high LIM = costly", same_as="LR"),
        LayerScore("BI", tuple(lr.bi), tuple(lr.bi), "high BI = costly", same_as="LR"),
        LayerScore("ZD", tuple(outliers.zd_layer), tuple(-v for v in outliers.zd_layer), "low ZD = costly"),
        LayerScore(f"|z|>{k} outliers", tuple(float(v) for v in outliers.outliers_layer),
                   tuple(float(v) for v in outliers.outliers_layer), "many outliers = costly"),
        LayerScore("attention cos", tuple(lr.attn_cos), tuple(-v for v in lr.attn_cos), "low cosine = costly"),
        LayerScore("MLP cos", tuple(lr.mlp_cos), tuple(-v for v in lr.mlp_cos), "low cosine = costly"),
    ]


@dataclass(frozen=True)
class Agreement:
    """One score against one action: Spearman ``rho`` with its bootstrap 95% interval, and top-k overlap."""

    score: str
    action: str
    action_label: str
    rho: float
    low: float
    high: float
    top_k: int
    overlap: float
    same_as: str | None = None  # the score whose ranking this one shares by definition (LIM, BI -> "LR")

    @property
    def verdict(self) -> str:
        """``well`` / ``partly`` / ``not`` / ``backwards``: from ρ and whether its interval excludes 0.

        A weak negative ρ (above −0.3) is ``not``, even when its interval excludes 0: such a score is of no
        use either way round, and "backwards" would overstate it.
        """
        if self.low > 0:
            return "well" if self.rho >= 0.6 else "partly"
        if self.high < 0 and self.rho <= BACKWARDS_RHO:
            return "backwards"
        return "not"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}

    @classmethod
    def from_dict(cls, data: dict) -> Agreement:
        return cls(**{k: v for k, v in data.items() if k != "verdict"})


def default_top_k(num_layers: int) -> int:
    """A fifth of the layers (at least 1): 6 of 30."""
    return max(1, round(num_layers / 5))


def _top(values: list[float], k: int) -> set[int]:
    """Indices of the ``k`` highest values."""
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])


def top_k_overlap(predicted: list[float], measured: list[float], k: int) -> float:
    """Share of the ``k`` layers highest in ``predicted`` that are among the ``k`` highest in ``measured``."""
    return len(_top(predicted, k) & _top(measured, k)) / k


def check_sample(n_windows: int) -> None:
    """Refuse samples too small for a bootstrap interval over windows."""
    if n_windows < MIN_WINDOWS:
        raise SampleTooSmallError(
            f"{n_windows} calibration window(s) are too few for a meaningful interval: use at least {MIN_WINDOWS} "
            "(16 or more for intervals narrow enough to tell scores apart).")


def bootstrap_damage(window_kl: list[list[float]], resamples: int, seed: int) -> torch.Tensor:
    """Per-layer mean damage ``[resamples, L]`` over windows resampled with replacement (seeded)."""
    values = torch.tensor(window_kl, dtype=torch.float64)  # [L, n]
    picks = torch.randint(0, values.shape[1], (resamples, values.shape[1]),
                          generator=torch.Generator().manual_seed(seed))
    return values[:, picks].mean(dim=-1).T


def agreement_table(scores: list[LayerScore], damages: list[ActionDamage], top_k: int | None = None,
                    resamples: int = RESAMPLES, seed: int = 0) -> list[Agreement]:
    """Every score against every action's measured KL; rows ordered by score, then action."""
    for damage in damages:
        check_sample(damage.n_windows)
        if damage.num_layers != len(scores[0].predicted):
            raise SensitivityError(f"The scores cover {len(scores[0].predicted)} layers but {damage.spec.label} was "
                             f"measured on {damage.num_layers}; score and measure the same model.")
    rows = []
    for damage in damages:
        k = top_k or default_top_k(damage.num_layers)
        resampled = [row.tolist() for row in bootstrap_damage(damage.window_kl, resamples, seed)]
        found: dict[str, tuple[float, float, float]] = {}  # score -> (rho, low, high)
        for score in sorted(scores, key=lambda s: s.same_as is not None):
            if score.same_as is None:
                rho = spearman(list(score.predicted), damage.kl)
                boot = torch.tensor([spearman(list(score.predicted), sample) for sample in resampled],
                                    dtype=torch.float64)
                low, high = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
                found[score.name] = (rho, low, high)
            rho, low, high = found[score.same_as or score.name]
            rows.append(Agreement(score.name, damage.spec.key, damage.spec.label, rho, low, high, k,
                                  top_k_overlap(list(score.predicted), damage.kl, k), score.same_as))
    order = {s.name: i for i, s in enumerate(scores)}
    return sorted(rows, key=lambda r: order[r.score])


def best_per_score(rows: list[Agreement]) -> list[Agreement]:
    """For each distinct score ranking: the action it predicts best (highest ρ)."""
    best: dict[str, Agreement] = {}
    for row in rows:
        if row.same_as is None and (row.score not in best or row.rho > best[row.score].rho):
            best[row.score] = row
    return list(best.values())
