"""Round-trip check of an export: perplexity of the reloaded model against the in-app model on the same windows."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from engine.core.data import TokenWindows
from engine.evaluation.perplexity import perplexity


@dataclass(frozen=True)
class RoundTrip:
    """Perplexities on the same windows and their relative difference (``export / in_app - 1``).

    ``tolerance``: the largest ``|rel_diff|`` this export promises (0.005 = 0.5%); ``None`` when it promises
    nothing (re-quantized tensors round a second time: the check only reports the change).
    """

    windows: str
    ppl_in_app: float
    ppl_export: float
    tolerance: float | None

    @property
    def rel_diff(self) -> float:
        return self.ppl_export / self.ppl_in_app - 1.0

    @property
    def passed(self) -> bool | None:
        return None if self.tolerance is None else abs(self.rel_diff) <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "rel_diff": self.rel_diff, "passed": self.passed}

    def summary(self) -> str:
        if self.tolerance is None:
            verdict = "no promise: re-quantized tensors"
        else:
            verdict = f"{'within' if self.passed else 'OUTSIDE'} ±{self.tolerance:.1%}"
        return (f"Reloaded perplexity {self.ppl_export:.3f} vs in-app {self.ppl_in_app:.3f} "
                f"({self.rel_diff:+.2%}, {verdict}) on {self.windows}.")


def round_trip(in_app: torch.nn.Module, reloaded: torch.nn.Module, windows: TokenWindows,
               tolerance: float | None, batch_size: int = 4) -> RoundTrip:
    """Perplexity of both models on ``windows`` (``[n, seqlen]`` token ids)."""
    ours = perplexity(in_app, windows, batch_size=batch_size).ppl
    theirs = perplexity(reloaded, windows, batch_size=batch_size).ppl
    return RoundTrip(windows.label(), ours, theirs, tolerance)
