"""LayerLab against llama.cpp on the same token windows: perplexity and KL divergence.

llama.cpp (through ``llama-cpp-python``, the library built by
:mod:`engine.llamacpp.build`) runs a GGUF file on exactly the token ids of a
:class:`~engine.core.data.TokenWindows` (BOS included where the windows have
it), one window per context, logits kept for every position.  The in-app
model runs the same windows.  Per window, both sides' next-token
distributions are compared at every scored position:

- perplexity of each side: ``exp(mean NLL)`` of tokens ``1..seqlen-1``;
- KL divergence ``KL(P_layerlab || Q_llamacpp)`` per position (nats), as
  ``llama-perplexity --kl-divergence`` prints it against its base model:
  mean, median, 99th percentile, and "same top" (how often both put the
  highest probability on the same token).

Memory: one window's logits of both sides at a time (``2 x seqlen x vocab``
float32: 0.5 GiB for 256 positions of Gemma-3's 262,144 words).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn
from engine.llamacpp.runtime import require

_ROWS = 64  # positions per float64 log-softmax chunk


@dataclass(frozen=True)
class Agreement:
    """LayerLab's model and llama.cpp's run of a GGUF file, scored on the same ``n_tokens`` positions."""

    gguf: str
    windows: str
    n_tokens: int
    ppl_layerlab: float
    ppl_llamacpp: float
    kld_mean: float
    kld_median: float
    kld_p99: float
    same_top: float

    @property
    def ppl_gap(self) -> float:
        """llama.cpp's perplexity relative to LayerLab's, minus 1 (0.01 = llama.cpp 1% higher)."""
        return self.ppl_llamacpp / self.ppl_layerlab - 1.0

    def to_dict(self) -> dict:
        return {**asdict(self), "ppl_gap": self.ppl_gap}

    def describe(self) -> str:
        return (f"perplexity: LayerLab {self.ppl_layerlab:.3f}, llama.cpp {self.ppl_llamacpp:.3f} "
                f"({self.ppl_gap:+.2%}); KL divergence LayerLab→llama.cpp mean {self.kld_mean:.5f}, "
                f"median {self.kld_median:.5f}, 99% {self.kld_p99:.5f}; same top token {self.same_top:.2%} "
                f"({self.n_tokens:,} positions, {self.windows})")


def open_gguf(path: str | Path, seqlen: int):
    """A ``llama_cpp.Llama`` on ``path`` with a context of ``seqlen`` and logits for every position."""
    require()
    import llama_cpp  # noqa: PLC0415 - loads llama.cpp's shared libraries: only when asked for

    return llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, n_batch=seqlen, n_ubatch=seqlen, logits_all=True,
                           verbose=False, n_threads=os.cpu_count() or 1, seed=0)


def llamacpp_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's logits ``[len(tokens), vocab]`` float32 for one window run from an empty context."""
    llm.reset()
    llm.eval(tokens)
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


@torch.no_grad()
def agreement(model: torch.nn.Module, gguf: str | Path, windows: TokenWindows,
              progress: ProgressFn | None = None) -> Agreement:
    """Perplexity and KL divergence of llama.cpp running ``gguf`` against ``model`` on ``windows``."""
    llm = open_gguf(gguf, windows.seqlen)
    n_vocab = llm.n_vocab()
    device = next(model.parameters()).device
    nll_a = nll_b = 0.0
    klds, same = [], 0
    for w, ids in enumerate(windows.input_ids):
        ours = model(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float().cpu().numpy()
        if ours.shape[1] != n_vocab:
            raise ValueError(f"The GGUF file has {n_vocab} words and the model {ours.shape[1]}: not the same model.")
        theirs = llamacpp_logits(llm, ids.tolist())[:-1]
        targets = ids[1:].numpy()
        for start in range(0, len(targets), _ROWS):
            rows = slice(start, start + _ROWS)
            p, q = _log_softmax(ours[rows]), _log_softmax(theirs[rows])
            index = np.arange(p.shape[0])
            nll_a -= p[index, targets[rows]].sum()
            nll_b -= q[index, targets[rows]].sum()
            klds.append((np.exp(p) * (p - q)).sum(axis=1))
            same += int((p.argmax(axis=1) == q.argmax(axis=1)).sum())
        if progress:
            progress(w + 1, windows.n_windows)
    kld = np.concatenate(klds)
    n = kld.size
    return Agreement(gguf=str(gguf), windows=windows.label(), n_tokens=n, ppl_layerlab=math.exp(nll_a / n),
                     ppl_llamacpp=math.exp(nll_b / n), kld_mean=float(kld.mean()), kld_median=float(np.median(kld)),
                     kld_p99=float(np.percentile(kld, 99)), same_top=same / n)
