"""KL divergence to the dense model on the same windows, for every evaluated run, in bounded memory.

What llama.cpp's ``llama-perplexity --kl-divergence`` reports against its
base model, per scored position (nats): mean, median, 99th percentile, and
"same top" (the compressed model's most likely next token is dense's).

The dense side of a window set is kept as a :class:`DenseReference`: per
scored position, dense's ``TOP_K`` most likely tokens with their
log-probabilities ``log p_i``, the tail mass ``r`` (every other token), and
``TAIL_SAMPLES`` tokens ``j`` drawn from dense's tail distribution ``p_j / r``
with their ``log p_j``.  A compressed model's divergence is

    KL = sum_{i in top-k} p_i (log p_i - log q_i) + r * mean_{j ~ tail} (log p_j - log q_j)

exact in the top-k term; the tail term is an unbiased sample estimate of
``sum_tail p (log p - log q)`` (0 for a model equal to dense; small noise per
position, none in the mean over thousands of positions).  Against the full
KL on the built-in model (4-bit RTN, 4 × 128 tokens) the mean was 0.1% off
(tests/evaluation/test_divergence.py asserts 1%).  Memory: about 1 KiB per position (8
MiB for 8,192 positions) whatever the vocabulary; full 16-bit log-probabilities
of Gemma-3's 262,144 words would take 4 GiB for 8,192 positions.

The reference is recorded while dense perplexity is measured (no extra pass)
and kept in memory and on disk, keyed by the model's fingerprint and the
token ids; a compressed run whose windows have none yet pays one dense pass.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from engine.core.data import TokenWindows
from engine.core.paths import cache_root

TOP_K = 64
TAIL_SAMPLES = 64
_KEPT = 8
_memory: OrderedDict[str, DenseReference] = OrderedDict()
_TINY = 1e-12


OBSERVE_ROWS = 256
"""Positions recorded at a time: the ``[rows, V]`` temporaries (softmax, tail, sampling) stay in cache-friendly
sizes at a 262k-word vocabulary."""


@dataclass
class DenseReference:
    """Dense's next-token distribution per scored position (N = windows × (seqlen − 1)): ``logp`` float32
    ``[N, k]`` and ``index`` int32 ``[N, k]`` of the top-k (most likely first), ``rest`` float64 ``[N]`` (log of the
    tail mass ``r``), ``samples`` int32 ``[N, s]`` (tokens drawn from the tail, ``p_j / r``) and ``sample_logp``
    float32 ``[N, s]`` (their ``log p_j``)."""

    logp: torch.Tensor
    index: torch.Tensor
    rest: torch.Tensor
    samples: torch.Tensor
    sample_logp: torch.Tensor

    @classmethod
    def empty(cls, n_positions: int, k: int = TOP_K, s: int = TAIL_SAMPLES) -> DenseReference:
        return cls(torch.zeros(n_positions, k), torch.zeros(n_positions, k, dtype=torch.int32),
                   torch.zeros(n_positions, dtype=torch.float64), torch.zeros(n_positions, s, dtype=torch.int32),
                   torch.zeros(n_positions, s))

    def observe(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        """Record dense's ``logits [m, V]`` at the flat ``positions [m]`` (in blocks of :data:`OBSERVE_ROWS`
        positions: at 262,144 words a block of 1,020 took 2.6× as long per position as one of 256 here)."""
        for start in range(0, logits.shape[0], OBSERVE_ROWS):
            self._observe(positions[start:start + OBSERVE_ROWS], logits[start:start + OBSERVE_ROWS])

    def _observe(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.float(), dim=-1)
        top, index = torch.topk(logp, self.logp.shape[1], dim=-1)
        tail = torch.exp(logp)
        tail.scatter_(1, index, 0.0)
        mass = tail.sum(dim=-1).double()  # a float32 sum: float64 copies of [m, V] cost seconds at 262k words
        generator = torch.Generator(device=logits.device).manual_seed(int(positions[0]))
        draws = torch.multinomial(tail + _TINY, self.samples.shape[1], replacement=True, generator=generator)
        positions = positions.cpu()
        self.logp[positions], self.index[positions] = top.cpu(), index.int().cpu()
        self.rest[positions] = torch.log(mass.clamp(min=_TINY)).cpu()
        self.samples[positions], self.sample_logp[positions] = draws.int().cpu(), logp.gather(1, draws).cpu()

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"logp": self.logp, "index": self.index, "rest": self.rest, "samples": self.samples,
                "sample_logp": self.sample_logp}


@dataclass(frozen=True)
class Divergence:
    """KL divergence to dense (nats per scored position) and top-1 agreement."""

    mean: float
    median: float
    p99: float
    same_top: float

    def to_metrics(self) -> dict:
        return {"kld_mean": self.mean, "kld_median": self.median, "kld_p99": self.p99, "same_top": self.same_top}


class DivergenceMeter:
    """Accumulates a model's KL divergence to ``reference`` from its logits, position by position."""

    def __init__(self, reference: DenseReference) -> None:
        self.reference = reference
        n = reference.rest.shape[0]
        self.kld = torch.zeros(n, dtype=torch.float64)
        self.same = torch.zeros(n, dtype=torch.bool)
        self.scored = torch.zeros(n, dtype=torch.bool)

    def observe(self, positions: torch.Tensor, logits: torch.Tensor) -> None:
        ref = self.reference
        positions = positions.cpu()
        logq = torch.log_softmax(logits.float(), dim=-1)
        q_top = logq.gather(1, ref.index[positions].long().to(logq.device)).double().cpu()
        q_tail = logq.gather(1, ref.samples[positions].long().to(logq.device)).double().cpu()
        p_top = ref.logp[positions].double()
        p_tail = ref.sample_logp[positions].double()
        kld = (torch.exp(p_top) * (p_top - q_top)).sum(dim=-1) \
            + torch.exp(ref.rest[positions]) * (p_tail - q_tail).mean(dim=-1)
        self.kld[positions] = kld
        self.same[positions] = logq.argmax(dim=-1).cpu() == ref.index[positions, 0].long()
        self.scored[positions] = True

    def result(self) -> Divergence:
        if not bool(self.scored.all()):
            raise RuntimeError("Some positions were not scored: the windows differ from the reference's.")
        kld = self.kld
        return Divergence(float(kld.mean()), float(kld.median()), float(torch.quantile(kld, 0.99)),
                          float(self.same.double().mean()))


def reference_key(fingerprint: str, windows: TokenWindows) -> str:
    digest = hashlib.sha256(windows.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:24]
    return f"{fingerprint[:16]}-{digest}-k{TOP_K}-s{TAIL_SAMPLES}"


def _path(key: str):
    return cache_root() / "kld" / f"{key}.pt"


def cached_reference(fingerprint: str, windows: TokenWindows) -> DenseReference | None:
    """The dense reference of these windows from memory or disk, else ``None`` (a damaged file is a miss)."""
    key = reference_key(fingerprint, windows)
    if key in _memory:
        _memory.move_to_end(key)
        return _memory[key]
    path = _path(key)
    if path.exists():
        try:
            found = DenseReference(**torch.load(path, weights_only=True))
        except Exception:  # noqa: BLE001 - any damage: recompute
            path.unlink(missing_ok=True)
            return None
        remember(fingerprint, windows, found, write=False)
        return found
    return None


def remember(fingerprint: str, windows: TokenWindows, reference: DenseReference, write: bool = True) -> None:
    """Keep ``reference`` in memory (a few window sets) and on disk."""
    key = reference_key(fingerprint, windows)
    _memory[key] = reference
    while len(_memory) > _KEPT:
        _memory.popitem(last=False)
    if write:
        path = _path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(reference.to_dict(), tmp)
        tmp.replace(path)


_COST: dict[tuple[int, str], tuple[float, float]] = {}


@torch.no_grad()
def divergence_seconds_per_position(vocab: int, device: torch.device | str = "cpu") -> tuple[float, float]:
    """(recording dense's reference, measuring a compressed model against it) in seconds per scored position at
    this vocabulary size: measured once per vocabulary and device on 64 random positions (time estimates; at
    262,144 words recording costs about as much as the forward pass itself)."""
    key = (int(vocab), str(device))
    if key not in _COST:
        m = 64
        logits = torch.randn(m, int(vocab), generator=torch.Generator().manual_seed(0)).to(device)
        positions = torch.arange(m)
        reference = DenseReference.empty(m)
        start = time.perf_counter()
        reference.observe(positions, logits)
        record = time.perf_counter() - start
        meter = DivergenceMeter(reference)
        start = time.perf_counter()
        meter.observe(positions, logits)
        _COST[key] = (record / m, (time.perf_counter() - start) / m)
    return _COST[key]
