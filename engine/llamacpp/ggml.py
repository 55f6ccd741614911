"""llama.cpp's own quantizers and dequantizers, called through ggml's C API (``libggml-base``).

``quantize(weight, qtype, importance)`` is ``ggml_quantize_chunk``, the very
function ``llama-quantize`` runs per tensor (with the per-column importance
of an imatrix when given); ``dequantize(blocks, qtype, shape)`` is the type's
``to_float``, what llama.cpp computes from those bytes.  So a weight
quantized here and written to a GGUF file is, bit for bit, the weight
llama.cpp loads: the preview is the deployed model.

Shapes: ``weight`` float32 ``[rows, n_per_row]`` (a linear's ``[out, in]``);
blocks uint8 ``[rows, row_bytes]`` with ``row_bytes = ggml_row_size(qtype,
n_per_row)``; ``importance`` float32 ``[n_per_row]`` (mean squared input
activation per column, as ``llama-imatrix`` collects it).  Both directions
release the GIL and split rows over threads.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import gguf
import numpy as np

from engine.llamacpp.runtime import require
from engine.quant.ggml_types import tensor_bytes

_TYPE_IDS = {t.name: int(t.value) for t in gguf.GGMLQuantizationType}
_ROWS_PER_TASK = 256


class _TypeTraits(ctypes.Structure):
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.c_int64)


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(require() / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def type_id(qtype: str) -> int:
    if qtype not in _TYPE_IDS:
        raise ValueError(f"Unknown ggml type '{qtype}'.")
    return _TYPE_IDS[qtype]


def row_bytes(qtype: str, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights in ``qtype`` (gguf's table; equal to ``ggml_row_size``)."""
    return tensor_bytes(qtype, 1, n_per_row)


def _threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def quantize(weight: np.ndarray, qtype: str, importance: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of ``weight [rows, n]`` float32 into ``qtype`` blocks ``[rows, row_bytes]`` uint8."""
    lib = _lib()
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    rows, n = weight.shape
    out = np.empty((rows, row_bytes(qtype, n)), dtype=np.uint8)
    imatrix = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if imatrix is not None and imatrix.shape != (n,):
        raise ValueError(f"importance has shape {imatrix.shape}; expected ({n},), one value per input column.")
    if imatrix is None and lib.ggml_quantize_requires_imatrix(type_id(qtype)):
        raise ValueError(f"llama.cpp's {qtype} needs an importance matrix (imatrix); turn imatrix on.")
    tid = type_id(qtype)

    def run(start: int) -> None:
        count = min(_ROWS_PER_TASK, rows - start)
        lib.ggml_quantize_chunk(tid, weight[start:].ctypes.data, out[start:].ctypes.data, 0, count, n,
                                None if imatrix is None else imatrix.ctypes.data)

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(run, range(0, rows, _ROWS_PER_TASK)))
    return out


def dequantize(blocks: np.ndarray, qtype: str, n_per_row: int) -> np.ndarray:
    """llama.cpp's ``to_float`` of ``blocks [rows, row_bytes]`` uint8: float32 ``[rows, n_per_row]``."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    rows = blocks.shape[0]
    if blocks.shape[1] != row_bytes(qtype, n_per_row):
        raise ValueError(f"{blocks.shape[1]} bytes per row do not hold {n_per_row} {qtype} weights.")
    to_float = _TO_FLOAT(_lib().ggml_get_type_traits(type_id(qtype)).contents.to_float)
    out = np.empty((rows, n_per_row), dtype=np.float32)

    def run(start: int) -> None:
        count = min(_ROWS_PER_TASK, rows - start)
        to_float(blocks[start:].ctypes.data, out[start:].ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                 count * n_per_row)

    with ThreadPoolExecutor(_threads()) as pool:
        list(pool.map(run, range(0, rows, _ROWS_PER_TASK)))
    return out
