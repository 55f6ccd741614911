"""Forward-pass latency of a model, and a dense-vs-compressed comparison (seconds)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from engine.evaluation.perplexity import model_device


@torch.no_grad()
def forward_latency(model: nn.Module, input_ids: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time (seconds) of one forward pass on ``input_ids`` ``[batch, seq]``."""
    ids = input_ids.to(model_device(model))
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        if ids.device.type == "cuda":
            torch.cuda.synchronize(ids.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare_latency(dense: nn.Module, sliced: nn.Module, input_ids: torch.Tensor, repeats: int = 5) -> dict:
    """``{"dense_s", "sliced_s", "speedup"}``: median forward seconds and dense / sliced."""
    dense_s = forward_latency(dense, input_ids, repeats)
    sliced_s = forward_latency(sliced, input_ids, repeats)
    return {"dense_s": dense_s, "sliced_s": sliced_s, "speedup": dense_s / sliced_s}


_THROUGHPUT: dict[tuple[int, str], tuple[float, float, int]] = {}  # (model, device) -> (tokens/s, when, readings)
THROUGHPUT_TTL_S = 300.0
"""Seconds a throughput reading stands before the next estimate measures again: a first reading taken while
the machine was busy (another job, a test run) would otherwise skew every estimate for the rest of the session."""
FIRST_RECHECK_S = 30.0
"""The first reading stands only this long: it is taken as the app starts, while the browser on the same machine
renders its first page (a Gemma-3 preview then read ≈ 30 s for 14 s)."""


@torch.no_grad()
def tokens_per_second(model: nn.Module, seqlen: int = 128) -> float:
    """Forward throughput (tokens/s) of ``model`` on one window: the median of 3 passes after a warm-up (the
    probe costs 1.1 s on SmolLM2-135M, 2.4 s on Gemma-3-270M here), measured again once the last reading is
    :data:`THROUGHPUT_TTL_S` old (the first one once it is :data:`FIRST_RECHECK_S` old); the fastest reading so
    far is kept (a busy machine only ever slows it)."""
    device = model_device(model)
    key = (id(model), str(device))
    cached = _THROUGHPUT.get(key)
    lifetime = THROUGHPUT_TTL_S if cached is None or cached[2] > 1 else FIRST_RECHECK_S
    if cached is None or time.monotonic() - cached[1] > lifetime:
        vocab = int(getattr(model.config, "vocab_size", 100))
        ids = torch.randint(0, vocab, (1, seqlen), generator=torch.Generator().manual_seed(0))
        measured = seqlen / forward_latency(model, ids, repeats=3, warmup=1)
        _THROUGHPUT[key] = (max(measured, cached[0] if cached else 0.0), time.monotonic(),
                            1 + (cached[2] if cached else 0))
    return _THROUGHPUT[key][0]


def estimate_seconds(model: nn.Module, tokens: int, forward_passes: float = 1.0) -> float:
    """Rough wall time (s) of ``forward_passes`` passes over ``tokens`` tokens, from the measured throughput."""
    return forward_passes * tokens / tokens_per_second(model)


def describe_seconds(seconds: float) -> str:
    """``"≈ 40 s"``, ``"≈ 3 min"``, ``"≈ 1.2 h"``."""
    if seconds < 90:
        return f"≈ {max(1, round(seconds))} s"
    if seconds < 5400:
        return f"≈ {round(seconds / 60)} min"
    return f"≈ {seconds / 3600:.1f} h"
