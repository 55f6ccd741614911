"""Paired comparison of two models scored on the same windows.

Dense and a compressed copy see the same text, so their per-window losses move together (a hard window is hard
for both).  The change in perplexity is judged by the per-window *differences* of summed NLL, bootstrapped over
windows: much tighter than two separately bootstrapped intervals, which overlap even for large changes.

``change = exp(mean ΔNLL per token) − 1`` equals ``ppl_b / ppl_a − 1`` exactly; its 95% interval comes from
resampling windows (with replacement) and recomputing the mean ΔNLL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 2000


@dataclass(frozen=True)
class PairedChange:
    """Relative perplexity change of ``b`` against ``a`` (a fraction: 0.05 = +5%) with its paired 95% interval."""

    change: float
    low: float
    high: float
    n_windows: int

    @property
    def within_noise(self) -> bool:
        """The paired interval contains 0: these windows cannot tell the two models apart."""
        return self.low <= 0.0 <= self.high

    def text(self) -> str:
        """E.g. ``"+4.2% (95% interval +3.1% to +5.4%)"``."""
        return f"{self.change:+.1%} (95% interval {self.low:+.1%} to {self.high:+.1%})"


def paired_change(nll_a: Sequence[float], nll_b: Sequence[float], tokens_per_window: int,
                  resamples: int = RESAMPLES, seed: int = 0) -> PairedChange:
    """Change of model ``b`` against model ``a`` from their summed NLL per window (nats, same windows in the same
    order, ``tokens_per_window`` scored tokens each).  One window: the interval is the point itself."""
    a = torch.as_tensor(list(nll_a), dtype=torch.float64)
    b = torch.as_tensor(list(nll_b), dtype=torch.float64)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"Paired windows must match: {a.numel()} vs {b.numel()} windows.")
    diff = (b - a) / tokens_per_window  # ΔNLL per token, per window
    change = math.expm1(float(diff.mean()))
    n = diff.numel()
    if n < 2:
        return PairedChange(change, change, change, n)
    picks = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    means = diff[picks].mean(dim=1)
    low, high = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=means.dtype)).tolist()
    return PairedChange(change, math.expm1(low), math.expm1(high), n)
