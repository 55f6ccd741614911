"""Perplexity in the GPTQ / SliceGPT convention (METHODS.md section 5).

Non-overlapping windows, each predicting tokens 1..seqlen-1 from their prefix;
ppl = exp(mean token NLL over all windows).  A bootstrap over windows gives a
95% interval, so a quick preview on few windows shows its own uncertainty.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn



@dataclass(frozen=True)
class PerplexityResult:
    """Token perplexity with its bootstrap 95% interval over windows."""

    ppl: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    seqlen: int
    ci_low: float
    ci_high: float

    def to_metrics(self) -> dict:
        return asdict(self)


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


@torch.no_grad()
def window_nll_sums(
    model: torch.nn.Module,
    windows: TokenWindows,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Summed next-token NLL (nats, fp64) of each window: shape ``[n_windows]``."""
    device = model_device(model)
    ids = windows.input_ids
    sums = torch.empty(ids.shape[0], dtype=torch.float64)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):  # one window at a time: log-softmax buffers of [T, V], not [b, T, V]
            nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="none")
            sums[start + row] = nll.sum().double().cpu()
        del logits
        if progress is not None:
            progress(min(start + batch_size, ids.shape[0]), ids.shape[0])
    return sums


def bootstrap_ppl_interval(
    nll_sums: torch.Tensor, tokens_per_window: int, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """2.5 / 97.5 percentiles of ppl when windows are resampled with replacement."""
    n = nll_sums.shape[0]
    if n < 2:
        ppl = math.exp(float(nll_sums.sum()) / (n * tokens_per_window))
        return ppl, ppl
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, n, (resamples, n), generator=generator)
    ppls = torch.exp(nll_sums[picks].sum(dim=1) / (n * tokens_per_window))
    low, high = torch.quantile(ppls, torch.tensor([0.025, 0.975], dtype=ppls.dtype)).tolist()
    return low, high


def perplexity(
    model: torch.nn.Module,
    windows: TokenWindows,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (no overlap, no stride)."""
    sums = window_nll_sums(model, windows, batch_size=batch_size, progress=progress)
    tokens_per_window = windows.seqlen - 1
    n_tokens = tokens_per_window * windows.n_windows
    mean_nll = float(sums.sum()) / n_tokens
    low, high = bootstrap_ppl_interval(sums, tokens_per_window)
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        mean_nll=mean_nll,
        n_tokens=n_tokens,
        n_windows=windows.n_windows,
        seqlen=windows.seqlen,
        ci_low=low,
        ci_high=high,
    )
