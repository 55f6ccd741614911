"""Perplexity in the GPTQ / SliceGPT convention (docs/methods.md §5).

Non-overlapping windows, each predicting tokens 1..seqlen-1 from their prefix;
ppl = exp(mean token NLL over all windows).  A bootstrap over windows gives a
95% interval, so a quick preview on few windows shows its own uncertainty.

Memory: a batch's full logits (``batch x seqlen x vocab``) are usually the
largest thing an evaluation holds (4 x 2048 x 128k values for Llama 3).  When
the model's logits are just its head applied to its decoder's last hidden
state (checked on a few tokens: families that scale or soft-cap logits after
the head fail the check and keep the full-logits path), the head runs on
:data:`HEAD_CHUNK` positions at a time and the logits are never held whole.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn


@dataclass(frozen=True)
class PerplexityResult:
    """Token perplexity with its bootstrap 95% interval over windows.

    ``window_nll``: summed NLL (nats) of each window's ``seqlen - 1`` scored tokens, in window order: what a
    paired comparison with another model on the same windows needs (:mod:`engine.evaluation.paired`).
    """

    ppl: float
    mean_nll: float
    n_tokens: int
    n_windows: int
    seqlen: int
    ci_low: float
    ci_high: float
    window_nll: tuple[float, ...] = ()

    def to_metrics(self) -> dict:
        metrics = asdict(self)
        metrics["window_nll"] = list(self.window_nll)
        return metrics


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the model's first parameter (where inputs must go)."""
    return next(model.parameters()).device


HEAD_CHUNK = 1024  # positions per head call when the head is applied in chunks


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model's decoder and output head, if it exposes them (transformers' ``get_decoder`` /
    ``get_output_embeddings``)."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


_PROBED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


@torch.no_grad()
def chunked_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(decoder, head)`` when ``model(ids).logits`` equals ``head(decoder(ids).last_hidden_state)`` bit for bit
    on a probe of 8 tokens (no scaling or soft-capping after the head), else ``None`` (use the full logits).

    The probe runs once per model object (remembered while the model lives); any error in it means ``None``.
    """
    parts = _decoder_and_head(model)
    if parts is None:
        return None
    if model not in _PROBED:
        _PROBED[model] = _head_matches(model, *parts)
    return parts if _PROBED[model] else None


def _head_matches(model: torch.nn.Module, decoder: torch.nn.Module, head: torch.nn.Module) -> bool:
    vocab = int(getattr(model.config, "vocab_size", 0) or 0)
    if vocab < 2:
        return False
    probe = (torch.arange(8, device=model_device(model)) * 7919 % vocab)[None]
    try:
        full = model(input_ids=probe, use_cache=False).logits
        ours = head(decoder(input_ids=probe, use_cache=False).last_hidden_state)
    except Exception:  # noqa: BLE001 - a decoder that cannot run alone: keep the full logits
        return False
    return ours.shape == full.shape and torch.equal(ours.to(full.device), full)  # the same ops: bit for bit


def head_chunk(model: torch.nn.Module) -> int | None:
    """Positions per head call when evaluating ``model`` (:data:`HEAD_CHUNK`), or ``None`` for full logits:
    what a memory plan counts."""
    return HEAD_CHUNK if chunked_head(model) is not None else None


LogitsObserver = Callable[[torch.Tensor, torch.Tensor], None]
"""Called with flat scored positions ``[m]`` (window × (seqlen − 1) + position) and their logits ``[m, V]``."""


def _nll_sums_chunked(decoder: torch.nn.Module, head: torch.nn.Module, batch: torch.Tensor,
                      observer: LogitsObserver | None = None, first_window: int = 0) -> torch.Tensor:
    """Summed NLL (fp64) of each row of ``batch`` ``[b, T]``, the head applied to :data:`HEAD_CHUNK` positions
    (of all rows together) at a time."""
    b, t = batch.shape
    hidden = decoder(input_ids=batch, use_cache=False).last_hidden_state[:, :-1]  # [b, T-1, D]
    hidden = hidden.reshape(b * (t - 1), hidden.shape[-1])
    targets, window = batch[:, 1:].reshape(-1), torch.arange(b, device=batch.device).repeat_interleave(t - 1)
    sums = torch.zeros(b, dtype=torch.float64, device=batch.device)
    for start in range(0, hidden.shape[0], HEAD_CHUNK):
        end = start + HEAD_CHUNK
        logits = head(hidden[start:end]).float()  # the head's device (layers may be spread over devices)
        nll = F.cross_entropy(logits, targets[start:end].to(logits.device), reduction="none")
        if observer is not None:
            observer(first_window * (t - 1) + torch.arange(start, start + logits.shape[0]), logits)
        sums.index_add_(0, window[start:end], nll.double().to(sums.device))
    return sums.cpu()


@torch.no_grad()
def window_nll_sums(
    model: torch.nn.Module,
    windows: TokenWindows,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    observer: LogitsObserver | None = None,
) -> torch.Tensor:
    """Summed next-token NLL (nats, fp64) of each window: shape ``[n_windows]``; ``observer`` sees every scored
    position's logits (:mod:`engine.evaluation.divergence`)."""
    device = model_device(model)
    ids = windows.input_ids
    sums = torch.empty(ids.shape[0], dtype=torch.float64)
    parts = chunked_head(model)
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size].to(device)
        if parts is not None:
            sums[start : start + batch.shape[0]] = _nll_sums_chunked(*parts, batch, observer, start)
            if progress is not None:
                progress(min(start + batch_size, ids.shape[0]), ids.shape[0])
            continue
        logits = model(input_ids=batch, use_cache=False).logits
        for row in range(batch.shape[0]):  # one window at a time: log-softmax buffers of [T, V], not [b, T, V]
            nll = F.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="none")
            sums[start + row] = nll.sum().double().cpu()
            if observer is not None:
                t = batch.shape[1] - 1
                observer((start + row) * t + torch.arange(t), logits[row, :-1].float())
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
    observer: LogitsObserver | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` (no overlap, no stride); ``observer``: see :func:`window_nll_sums`."""
    sums = window_nll_sums(model, windows, batch_size=batch_size, progress=progress, observer=observer)
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
        window_nll=tuple(sums.tolist()),
    )
