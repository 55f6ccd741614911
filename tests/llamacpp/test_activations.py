"""The in-app model multiplies llama.cpp-type weights by the activations llama.cpp's CPU backend uses: its own
``quantize_row_q8_0`` / ``q8_1`` / ``q8_K`` (called here from ``libggml-cpu``) decoded, equal bit for bit."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from engine.llamacpp.runtime import status
from engine.quant.ggml_activations import VEC_DOT_TYPE, as_llamacpp_input

pytestmark = pytest.mark.skipif(not status().available, reason=f"llama.cpp: {status().reason}")
BLOCK_BYTES = {"Q8_0": (32, 34), "Q8_1": (32, 36), "Q8_K": (256, 292)}


def _llamacpp(x: np.ndarray, kind: str) -> np.ndarray:
    """llama.cpp's conversion of float rows ``x [rows, n]`` to ``kind`` blocks, decoded to float32."""
    from engine.llamacpp.runtime import require

    lib = ctypes.CDLL(str(require() / "lib" / "libggml-cpu.so"))
    quantize = getattr(lib, f"quantize_row_{kind.lower().replace('q8_k', 'q8_K')}")
    quantize.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    block, size = BLOCK_BYTES[kind]
    rows, n = x.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    raw = np.zeros((rows, n // block * size), dtype=np.uint8)
    for r in range(rows):
        quantize(x[r].ctypes.data, raw[r].ctypes.data, n)
    blocks = raw.reshape(rows, n // block, size)
    if kind == "Q8_K":
        d = blocks[..., :4].copy().view(np.float32)
        q = blocks[..., 4:260].copy().view(np.int8).astype(np.float32)
    else:
        d = blocks[..., :2].copy().view(np.float16).astype(np.float32)
        q = blocks[..., size - 32:].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(rows, n)


def _activations(rows: int = 12, n: int = 1024) -> np.ndarray:
    generator = np.random.default_rng(1)
    x = generator.standard_normal((rows, n)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block
    x[1, 5] = 40.0  # an outlier, as real activations have
    x[2, 7], x[2, 9] = -3.5, 3.5  # equal magnitudes: the first one sets the sign of Q8_K's scale
    x[3] *= 1e-6
    return x


@pytest.mark.parametrize("kind", ["Q8_0", "Q8_1", "Q8_K"])
def test_activations_equal_llamacpps_own_conversion(kind):
    x = _activations()
    weight_type = next(t for t, k in VEC_DOT_TYPE.items() if k == kind)
    ours = as_llamacpp_input(torch.from_numpy(x), weight_type).numpy()
    theirs = _llamacpp(x, kind)
    assert np.array_equal(ours, theirs), f"max difference {np.abs(ours - theirs).max()}"
    assert not np.array_equal(ours, x)  # it did quantize


def test_float_types_round_and_bad_rows_are_refused():
    x = torch.tensor([[1.0 + 2**-12, 3.0]])
    assert as_llamacpp_input(x, "F16")[0, 0].item() == 1.0 and as_llamacpp_input(x, "F32") is x
    with pytest.raises(ValueError, match="not whole Q8_K blocks"):
        as_llamacpp_input(torch.ones(2, 300), "Q4_K")
