"""Caches of quantized layers: in memory (LRU, bounded) and on disk (checked safetensors).

Entries are keyed by model fingerprint, architecture, quantizer spec (with
its bits) and, for GPTQ, the calibration windows and device; for sequential
GPTQ also by the allocation prefix (the bits of every earlier layer, which
shaped the layer's calibration signals).  One file per layer under
``cache_root()/quant/<key>/layer_NNN.safetensors``.  A damaged
file is a miss: it is deleted and recomputed.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import torch

from engine.core.data import TokenWindows
from engine.core.keys import cache_key
from engine.core.models import LoadedModel
from engine.core.paths import cache_root
from engine.quant.files import (
    CorruptFileError,
    layer_from_tensors,
    layer_to_tensors,
    read_checked,
    write_checked,
)
from engine.quant.grid import QuantizedWeight, QuantizerSpec
from engine.quant.layer_bits import LayerBits, cache_form

LayerWeights = dict[str, QuantizedWeight]  # short linear name -> stored weight
QUANT_VERSION = 2  # 2: static-group GPTQ, sequential propagation, fp64 Hessians
MEMORY_CACHE_BYTES = 1536 * 2**20

_memory: OrderedDict[tuple[str, int], LayerWeights] = OrderedDict()
_memory_bytes = 0
_lock = threading.Lock()


def clear_memory_cache() -> None:
    """Forget in-memory quantized layers (the disk cache stays)."""
    global _memory_bytes
    with _lock:
        _memory.clear()
        _memory_bytes = 0


def _layer_bytes(weights: LayerWeights) -> int:
    return sum(w.nbytes_in_memory() for w in weights.values())


def memory_get(key: str, layer: int) -> LayerWeights | None:
    with _lock:
        value = _memory.get((key, layer))
        if value is not None:
            _memory.move_to_end((key, layer))
        return value


def memory_put(key: str, layer: int, weights: LayerWeights) -> None:
    global _memory_bytes
    size = _layer_bytes(weights)
    with _lock:
        if (key, layer) in _memory:
            return
        _memory[(key, layer)] = weights
        _memory_bytes += size
        while _memory_bytes > MEMORY_CACHE_BYTES and len(_memory) > 1:
            _, old = _memory.popitem(last=False)
            _memory_bytes -= _layer_bytes(old)


def calibration_id(windows: TokenWindows | None, batch_size: int) -> dict | None:
    """What identifies calibration data: its spec, shape and a hash of the token ids."""
    if windows is None:
        return None
    digest = hashlib.sha256(windows.input_ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]
    return {"spec": windows.key(), "n_windows": windows.n_windows, "seqlen": windows.seqlen,
            "ids_sha256": digest, "batch_size": batch_size, "label": windows.label()}


def quant_cache_key(loaded: LoadedModel, spec: QuantizerSpec, calibration: dict | None,
                    prefix: tuple[LayerBits, ...] | None = None, module_bits: dict[str, int] | None = None) -> str:
    """Cache folder name for one model, one quantizer spec (with bits) and one calibration.

    ``prefix``: bits of the layers before the cached one, for results that
    depend on them (sequential GPTQ); ``None`` for independent results.
    ``module_bits``: the cached layer's own per-linear levels when they differ (``spec.bits`` is then their
    maximum); per-layer entries leave keys as they always were.
    """
    gptq = spec.method == "gptq"
    extra = {} if prefix is None else {"prefix": [cache_form(b) for b in prefix]}
    if module_bits is not None:
        extra["module_bits"] = cache_form(module_bits)
    return cache_key(kind="quant_layers", version=QUANT_VERSION, fingerprint=loaded.fingerprint,
                     model_type=loaded.architecture.model_type, spec=spec.to_dict(),
                     calibration=calibration if spec.needs_calibration else None,
                     device=loaded.device.type if gptq else None, **extra)


def _disk_path(key: str, layer: int):
    return cache_root() / "quant" / key / f"layer_{layer:03d}.safetensors"


def disk_get(key: str, layer: int) -> LayerWeights | None:
    path = _disk_path(key, layer)
    if not path.exists():
        return None
    try:
        tensors, info = read_checked(path)
        return layer_from_tensors(tensors, info["linears"])
    except (CorruptFileError, KeyError):
        path.unlink(missing_ok=True)  # damaged entry: a miss, recomputed and rewritten
        return None


def disk_put(key: str, layer: int, weights: LayerWeights, spec: QuantizerSpec) -> None:
    tensors, config = layer_to_tensors(weights)
    write_checked(_disk_path(key, layer), tensors, {"linears": config, "layer": layer, "spec": spec.to_dict()})
