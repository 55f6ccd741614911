"""LayerLab against llama.cpp on the same token windows: perplexity and KL divergence.

llama.cpp (through ``llama-cpp-python``, the library built by
:mod:`engine.llamacpp.build`) runs a GGUF file on exactly the token ids of a
:class:`~engine.core.data.TokenWindows` (BOS included where the windows have
it), one window per context, logits kept for every position.  In-app models
run the same windows.  :func:`compare_sides` scores any number of *sides*
(a torch model or a GGUF file each) on every scored position:

- perplexity of each side: ``exp(mean NLL)`` of tokens ``1..seqlen-1``;
- for every pair ``(a, b)`` with ``a`` before ``b``: the KL divergence
  ``KL(P_a || P_b)`` per position (nats), summarised as
  ``llama-perplexity --kl-divergence`` prints it against its base model:
  mean, median, 99th percentile, and "same top" (how often both put the
  highest probability on the same token).

:func:`agreement` is the two-side case (an in-app model and a GGUF file);
:func:`verify_export` the check after an export (dense in-app, the
compressed in-app model, llama.cpp running the file, and llama.cpp running it
one ulp off: the floor below).

:func:`one_ulp_floor` is how far llama.cpp moves from *itself* when one norm
weight vector of the file is one ulp larger.  In quantized types llama.cpp
rounds every matmul's input to 8-bit codes, a discontinuous step: a last-bit
difference flips some codes and the flips compound through the layers.  Two
float implementations of the same file (the app and llama.cpp) cannot agree
more closely than that floor (on the built-in models' 4/3-bit k-quant mixes
about 0.008 nats, the same as app vs llama.cpp: ``bench/llamacpp_agreement.py``).

Memory: one window's logits of every side at a time (``seqlen x vocab``
float32 each: 0.25 GiB for 256 positions of Gemma-3's 262,144 words).
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from engine.core.data import TokenWindows
from engine.core.progress import ProgressFn
from engine.evaluation.divergence import Divergence
from engine.llamacpp.runtime import require

_ROWS = 64  # positions per float64 log-softmax chunk
Side = torch.nn.Module | str | Path


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


def _logits_fn(side: Side, seqlen: int) -> Callable[[torch.Tensor], np.ndarray]:
    """Logits ``[seqlen - 1, vocab]`` float32 of one window ``[seqlen]`` (the predictions of tokens 1..)."""
    if isinstance(side, torch.nn.Module):
        device = next(side.parameters()).device

        def run_model(ids: torch.Tensor) -> np.ndarray:
            with torch.no_grad():
                return side(input_ids=ids[None].to(device), use_cache=False).logits[0, :-1].float().cpu().numpy()
        return run_model
    llm = open_gguf(side, seqlen)

    def run_gguf(ids: torch.Tensor) -> np.ndarray:
        llm.reset()
        llm.eval(ids.tolist())
        return np.array(llm.scores[: len(ids) - 1], dtype=np.float32)
    return run_gguf


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    rows = rows.astype(np.float64)
    rows -= rows.max(axis=1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=1, keepdims=True))


def _compare_rows(logits: dict[str, np.ndarray], targets: np.ndarray, pairs: list[tuple[str, str]]):
    """For ``[rows, vocab]`` logits of each side and the rows' next tokens: each side's summed NLL (nats), each
    pair's KL divergence per row and how many rows share their most likely token."""
    logp = {name: _log_softmax(v) for name, v in logits.items()}
    index = np.arange(len(targets))
    nll = {name: -float(lp[index, targets].sum()) for name, lp in logp.items()}
    kl = {(a, b): (np.exp(logp[a]) * (logp[a] - logp[b])).sum(axis=1) for a, b in pairs}
    same = {(a, b): int((logp[a].argmax(axis=1) == logp[b].argmax(axis=1)).sum()) for a, b in pairs}
    return nll, kl, same


_COMPARE_COST: dict[tuple[int, int, int], float] = {}
_TIMED_ROWS = 16


def comparison_seconds_per_position(vocab: int, n_sides: int = 4, n_pairs: int = 4) -> float:
    """Seconds per scored position that :func:`compare_sides` spends beyond the forward passes at this vocabulary
    size (copying llama.cpp's logits, log-softmax of every side, KL of every pair): measured once on random rows,
    for time estimates (about 15 s of the export check's 4 windows at Gemma-3's 262,144 words)."""
    key = (int(vocab), n_sides, n_pairs)
    if key not in _COMPARE_COST:
        rng = np.random.default_rng(0)
        names = [f"side{i}" for i in range(n_sides)]
        rows = rng.standard_normal((_TIMED_ROWS, int(vocab)), dtype=np.float32)
        pairs = [(names[i % n_sides], names[(i + 1) % n_sides]) for i in range(n_pairs)]
        times = []
        for _ in range(2):  # the first pass also pays for the fresh memory: the faster one is the steady cost
            start = time.perf_counter()
            copied = {name: np.array(rows, dtype=np.float32) for name in names}  # llama.cpp's scores as arrays
            _compare_rows(copied, rng.integers(0, int(vocab), _TIMED_ROWS), pairs)
            times.append(time.perf_counter() - start)
        _COMPARE_COST[key] = min(times) / _TIMED_ROWS
    return _COMPARE_COST[key]


@dataclass(frozen=True)
class Comparison:
    """Perplexity of every side and the divergence of every pair ``(a, b)``, ``a`` before ``b`` in the sides."""

    names: tuple[str, ...]
    windows: str
    n_tokens: int
    ppl: dict[str, float]
    divergence: dict[tuple[str, str], Divergence]

    def to_dict(self) -> dict:
        return {"sides": list(self.names), "windows": self.windows, "n_tokens": self.n_tokens, "ppl": self.ppl,
                "kld": {f"{a} -> {b}": asdict(d) for (a, b), d in self.divergence.items()}}


def compare_sides(sides: dict[str, Side], windows: TokenWindows, progress: ProgressFn | None = None,
                  pairs: list[tuple[str, str]] | None = None) -> Comparison:
    """Perplexity of each side and KL divergences between them on ``windows`` (see the module docstring):
    every pair ``(a, b)`` with ``a`` before ``b``, or only ``pairs``."""
    names = tuple(sides)
    run = {name: _logits_fn(side, windows.seqlen) for name, side in sides.items()}
    if pairs is None:
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    nll = dict.fromkeys(names, 0.0)
    klds: dict[tuple[str, str], list[np.ndarray]] = {p: [] for p in pairs}
    same = dict.fromkeys(pairs, 0)
    for w, ids in enumerate(windows.input_ids):
        logits = {name: run[name](ids) for name in names}
        vocab = {v.shape[1] for v in logits.values()}
        if len(vocab) != 1:
            raise ValueError(f"The sides have different vocabularies ({sorted(vocab)} words): not the same model.")
        targets = ids[1:].numpy()
        for start in range(0, len(targets), _ROWS):
            rows = slice(start, start + _ROWS)
            chunk_nll, chunk_kl, chunk_same = _compare_rows({name: v[rows] for name, v in logits.items()},
                                                            targets[rows], pairs)
            for name in names:
                nll[name] += chunk_nll[name]
            for pair in pairs:
                klds[pair].append(chunk_kl[pair])
                same[pair] += chunk_same[pair]
        if progress:
            progress(w + 1, windows.n_windows)
    n = windows.n_windows * (windows.seqlen - 1)
    divergence = {}
    for pair in pairs:
        values = np.concatenate(klds[pair])
        divergence[pair] = Divergence(float(values.mean()), float(np.median(values)),
                                      float(np.percentile(values, 99)), same[pair] / n)
    return Comparison(names, windows.label(), n, {k: math.exp(v / n) for k, v in nll.items()}, divergence)


def agreement(model: torch.nn.Module, gguf: str | Path, windows: TokenWindows,
              progress: ProgressFn | None = None) -> Agreement:
    """Perplexity and KL divergence of llama.cpp running ``gguf`` against ``model`` on ``windows``."""
    found = compare_sides({"LayerLab": model, "llama.cpp": gguf}, windows, progress)
    d = found.divergence[("LayerLab", "llama.cpp")]
    return Agreement(gguf=str(gguf), windows=found.windows, n_tokens=found.n_tokens,
                     ppl_layerlab=found.ppl["LayerLab"], ppl_llamacpp=found.ppl["llama.cpp"], kld_mean=d.mean,
                     kld_median=d.median, kld_p99=d.p99, same_top=d.same_top)


_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""Bytes of GGUF's fixed-size metadata value types (8: string, 9: array are sized as they go)."""


def _tensor_span(data: bytes | memoryview, name: str) -> tuple[int, int, int]:
    """``(byte offset, ggml type, elements)`` of tensor ``name`` in a GGUF file's bytes, from its header alone.

    Skips the metadata without decoding it (``gguf.GGUFReader`` decodes every vocabulary entry: 2 s for
    SmolLM2's 49k tokens, 9 s for Gemma-3's 262k, here).
    """
    u32, u64 = struct.Struct("<I"), struct.Struct("<Q")
    if bytes(data[:4]) != b"GGUF" or len(data) < 24 or u32.unpack_from(data, 4)[0] not in (2, 3):
        raise ValueError("not a little-endian GGUF file of version 2 or 3")
    n_tensors, n_kv = u64.unpack_from(data, 8)[0], u64.unpack_from(data, 16)[0]
    pos, alignment = 24, 32

    def skip(kind: int, pos: int) -> int:
        if kind in _SCALAR_BYTES:
            return pos + _SCALAR_BYTES[kind]
        if kind == 8:
            return pos + 8 + u64.unpack_from(data, pos)[0]
        item, count = u32.unpack_from(data, pos)[0], u64.unpack_from(data, pos + 4)[0]
        pos += 12
        if item in _SCALAR_BYTES:
            return pos + count * _SCALAR_BYTES[item]
        for _ in range(count):
            pos = skip(item, pos)
        return pos

    for _ in range(n_kv):
        length = u64.unpack_from(data, pos)[0]
        key = bytes(data[pos + 8:pos + 8 + length])
        kind = u32.unpack_from(data, pos + 8 + length)[0]
        pos += 12 + length
        if key == b"general.alignment":
            alignment = u32.unpack_from(data, pos)[0]
        pos = skip(kind, pos)
    found = None
    for _ in range(n_tensors):
        length = u64.unpack_from(data, pos)[0]
        tensor = bytes(data[pos + 8:pos + 8 + length]).decode()
        n_dims = u32.unpack_from(data, pos + 8 + length)[0]
        pos += 12 + length
        dims = struct.unpack_from(f"<{n_dims}Q", data, pos)
        pos += 8 * n_dims
        ggml_type, offset = u32.unpack_from(data, pos)[0], u64.unpack_from(data, pos + 4)[0]
        pos += 12
        if tensor == name:
            found = (offset, ggml_type, math.prod(dims))
    if found is None:
        raise ValueError(f"no tensor {name}")
    if alignment < 1:
        raise ValueError(f"general.alignment is {alignment}")
    start = pos + (-pos) % alignment + found[0]
    if start + 4 * found[2] > len(data) and found[1] == 0:
        raise ValueError("the file is shorter than its header says (truncated?)")
    return start, found[1], found[2]


def nudged_copy(gguf: str | Path, target: str | Path, tensor: str = "blk.0.attn_norm.weight") -> Path:
    """A copy of ``gguf`` at ``target`` with the float32 ``tensor`` one ulp larger (towards +inf)."""
    import mmap
    import shutil

    shutil.copy(gguf, target)
    with open(target, "r+b") as handle, mmap.mmap(handle.fileno(), 0) as data:
        try:
            offset, ggml_type, count = _tensor_span(data, tensor)
        except (ValueError, struct.error, OverflowError) as err:
            raise ValueError(f"{gguf} has no float32 tensor {tensor} ({err}).") from None
        if ggml_type != 0:  # GGML_TYPE_F32
            raise ValueError(f"{gguf} has no float32 tensor {tensor}.")
        nudged = np.nextafter(np.frombuffer(data, dtype=np.float32, count=count, offset=offset).copy(),
                              np.float32(np.inf))  # a copy: no view of the map outlives it
        data[offset:offset + 4 * count] = nudged.tobytes()
        data.flush()
    return Path(target)


def one_ulp_floor(gguf: str | Path, windows: TokenWindows, work: str | Path) -> Divergence:
    """KL divergence of llama.cpp running ``gguf`` to llama.cpp running it with one norm vector one ulp larger
    (:func:`nudged_copy`, written into the folder ``work``): the least any other implementation can differ by."""
    nudged = nudged_copy(gguf, Path(work) / (Path(gguf).stem + "-nudged.gguf"))
    return compare_sides({"file": gguf, "nudged": nudged}, windows).divergence[("file", "nudged")]


PPL_PROMISE = 0.005
"""An export in llama.cpp's types passes when llama.cpp's perplexity is within this of the app's ..."""
FLOOR_FACTOR = 1.5
"""... or when the app -> llama.cpp KL divergence is at most this times llama.cpp's own one-ulp floor."""


def within_floor(kld_between: float, floor: dict | None) -> bool:
    """Whether the app -> llama.cpp KL divergence (nats per token) is within :data:`FLOOR_FACTOR` × llama.cpp's
    one-ulp floor (``floor["kld"]``; ``None``: not measured)."""
    return floor is not None and kld_between <= FLOOR_FACTOR * floor["kld"]


def check_passes(ppl_gap: float, kld_between: float, floor: dict | None) -> bool:
    """Whether llama.cpp computes what the app computed: perplexity within :data:`PPL_PROMISE`, or
    :func:`within_floor`."""
    return abs(ppl_gap) <= PPL_PROMISE or within_floor(kld_between, floor)


def verify_export(dense: torch.nn.Module, compressed: torch.nn.Module, gguf: str | Path, windows: TokenWindows,
                  progress: ProgressFn | None = None) -> dict:
    """"Verify in llama.cpp": dense (in-app), the compressed model (in-app), llama.cpp running the exported file
    and llama.cpp running it with one norm vector one ulp larger (:func:`nudged_copy`), on the same windows.

    Returns perplexities and every pair's KL divergence (:meth:`Comparison.to_dict`), ``ppl_gap`` (llama.cpp vs
    the app), ``floor`` (llama.cpp vs its nudged self: ``ppl_gap`` and ``kld``; ``None`` when the file has no
    float32 norm to nudge), ``passed`` and a one-line ``summary``.  On a few windows llama.cpp's activation
    rounding alone moves perplexity by up to ~1% (the floor), so the check passes when the perplexity is within
    :data:`PPL_PROMISE` or the app is no further from llama.cpp than :data:`FLOOR_FACTOR` × that floor's KLD.
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="layerlab-floor-") as tmp:
        sides: dict[str, Side] = {"dense": dense, "LayerLab": compressed, "llama.cpp": gguf}
        pairs = [("dense", "LayerLab"), ("dense", "llama.cpp"), ("LayerLab", "llama.cpp")]
        try:
            sides["llama.cpp, one ulp"] = nudged_copy(gguf, Path(tmp) / "nudged.gguf")
            pairs.append(("llama.cpp", "llama.cpp, one ulp"))
        except (ValueError, OSError):  # no float32 norm, or no room for the copy: judged on perplexity alone
            pass
        found = compare_sides(sides, windows, progress, pairs)
    in_app, deployed = found.divergence[("dense", "LayerLab")], found.divergence[("dense", "llama.cpp")]
    between = found.divergence[("LayerLab", "llama.cpp")]
    gap = found.ppl["llama.cpp"] / found.ppl["LayerLab"] - 1.0
    floor = None
    if "llama.cpp, one ulp" in found.ppl:
        floor = {"ppl_gap": found.ppl["llama.cpp, one ulp"] / found.ppl["llama.cpp"] - 1.0,
                 "kld": found.divergence[("llama.cpp", "llama.cpp, one ulp")].mean}
    passed = check_passes(gap, between.mean, floor)
    summary = (f"llama.cpp ran the file: perplexity {found.ppl['llama.cpp']:.3f} vs {found.ppl['LayerLab']:.3f} in "
               f"the app ({gap:+.2%}; dense {found.ppl['dense']:.3f}); KL divergence to dense {deployed.mean:.4f} "
               f"(app: {in_app.mean:.4f}), same top token as dense {deployed.same_top:.1%} "
               f"(app: {in_app.same_top:.1%}); {found.n_tokens:,} positions of {found.windows}.")
    if floor is not None:
        summary += (" llama.cpp against itself with one norm vector one ulp larger: perplexity "
                    f"{floor['ppl_gap']:+.2%}, KL divergence {floor['kld']:.4f} "
                    f"(the app against llama.cpp: {between.mean:.4f}): "
                    + ("the app agrees with llama.cpp as closely as llama.cpp agrees with itself."
                       if within_floor(between.mean, floor) else
                       "the app and llama.cpp differ by more than llama.cpp's own rounding noise."))
    return {**found.to_dict(), "ppl_gap": gap, "floor": floor, "passed": passed, "summary": summary}
