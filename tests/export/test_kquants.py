"""k-quant packers (engine/export/kquants.py) against gguf's own dequantizers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from engine.export.kquants import KQUANT_PACKERS, _quantize, quantize_kquant

T = gguf.GGMLQuantizationType
KTYPES = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K]  # fewest bits first
EXACT_GRID = {T.Q3_K: (4, 0.5), T.Q6_K: (32, 0.25)}  # symmetric types: (levels below zero, power-of-two step)


def _rel_rms(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.sqrt(np.mean((approx - exact) ** 2) / np.mean(exact**2)))


def _awkward_rows() -> np.ndarray:
    """Random rows plus the edge cases: zeros, constants, outliers, one-signed rows, tiny and huge magnitudes."""
    rng = np.random.default_rng(7)
    n = 512
    rows = [rng.standard_normal(n) * 0.02 for _ in range(8)]
    rows += [
        np.zeros(n),
        np.full(n, 0.75),
        np.full(n, -1.25),
        -np.abs(rng.standard_normal(n)),  # negative only
        np.abs(rng.standard_normal(n)),  # positive only
        rng.standard_normal(n) * 1e-6,  # super-block scales in fp16's subnormal range
        rng.standard_normal(n) * 3e3,
        rng.uniform(-1, 1, n) + 5.0,  # large offset, small spread
    ]
    outlier = rng.standard_normal(n) * 0.05
    outlier[37] = 400.0
    rows.append(outlier)
    neg_outlier = rng.standard_normal(n) * 0.05
    neg_outlier[300] = -250.0
    rows.append(neg_outlier)
    half_zero = rng.standard_normal(n)
    half_zero[:256] = 0.0  # one all-zero super-block next to a normal one
    rows.append(half_zero)
    sparse = np.zeros(n)
    sparse[::17] = rng.standard_normal(len(sparse[::17]))  # many all-zero sub-blocks
    rows.append(sparse)
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_gguf_dequantizes_exactly_what_the_packer_intended(qtype):
    weights = _awkward_rows()
    packed, intended = _quantize(weights, qtype)
    assert packed.dtype == np.uint8
    decoded = gguf.quants.dequantize(packed, qtype)
    assert decoded.shape == weights.shape
    assert np.isfinite(decoded).all()
    assert np.array_equal(decoded, intended)
    # the public packer writes the same bytes
    assert np.array_equal(KQUANT_PACKERS[qtype](weights), packed)
    # zero rows stay zero, constant rows stay (nearly) constant
    assert not decoded[8].any()
    np.testing.assert_allclose(decoded[9], 0.75, rtol=2e-3)
    np.testing.assert_allclose(decoded[10], -1.25, rtol=2e-3)


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_saturates_instead_of_overflowing_fp16(qtype):
    weights = np.random.default_rng(3).standard_normal((2, 256)).astype(np.float32)
    weights[1, 5] = 3e7  # super-block scale beyond fp16's 65504 for the 2-bit types
    packed, intended = _quantize(weights, qtype)
    decoded = gguf.quants.dequantize(packed, qtype)
    assert np.isfinite(decoded).all()
    assert np.array_equal(decoded, intended)


def test_quality_on_gaussian_weights_is_ordered_by_bits():
    weights = np.random.default_rng(0).standard_normal((32, 1024)).astype(np.float32)
    errors = {t: _rel_rms(gguf.quants.dequantize(quantize_kquant(weights, t), t), weights) for t in KTYPES}
    # measured: Q2_K 0.266, Q3_K 0.145, Q4_K 0.071, Q5_K 0.035, Q6_K 0.017
    bounds = {T.Q2_K: 0.30, T.Q3_K: 0.16, T.Q4_K: 0.08, T.Q5_K: 0.04, T.Q6_K: 0.02}
    for t in KTYPES:
        assert errors[t] < bounds[t], (t.name, errors[t])
    values = [errors[t] for t in KTYPES]
    assert values == sorted(values, reverse=True), errors
    # k-quants beat the 32-element legacy types with the same code bits
    q4_0 = gguf.quants.dequantize(gguf.quants.quantize(weights, T.Q4_0), T.Q4_0)
    assert errors[T.Q4_K] < _rel_rms(q4_0, weights)


@pytest.mark.parametrize(
    ("qtype", "bound"), [(T.Q2_K, 0.95), (T.Q3_K, 0.3), (T.Q4_K, 0.35), (T.Q5_K, 0.3), (T.Q6_K, 0.04)],
    ids=lambda v: getattr(v, "name", "")
)
def test_an_outlier_does_not_wipe_out_its_super_block(qtype, bound):
    """A 100-sigma weight sets the super-block scale; the other sub-blocks still decode better than zeros.

    (Plain rounding of the sub-block scales, as llama.cpp's reference does, gives Q2_K 1.8 here:
    scales that round to 0 leave those weights at the constant -min.)  Measured: 0.85, 0.23, 0.28, 0.23, 0.023.
    """
    rng = np.random.default_rng(5)
    weights = rng.standard_normal((16, 256)).astype(np.float32)
    weights[:, 100] = 100.0
    rest = np.ones(256, bool)
    rest[96:112] = False  # the outlier's own sub-block
    decoded = gguf.quants.dequantize(quantize_kquant(weights, qtype), qtype)
    assert _rel_rms(decoded[:, rest], weights[:, rest]) < bound


@pytest.mark.parametrize("qtype", list(EXACT_GRID), ids=lambda t: t.name)
def test_symmetric_grid_reproduces_exactly(qtype):
    levels, step = EXACT_GRID[qtype]
    rng = np.random.default_rng(1)
    codes = rng.integers(-levels, levels, size=(4, 512))
    codes.reshape(-1, 16)[:, 0] = -levels  # each sub-block spans the grid's negative end
    weights = (codes * step).astype(np.float32)
    decoded = gguf.quants.dequantize(quantize_kquant(weights, qtype), qtype)
    assert np.array_equal(decoded, weights)


@pytest.mark.parametrize(
    ("qtype", "levels", "sub"), [(T.Q2_K, 3, 16), (T.Q4_K, 15, 32), (T.Q5_K, 31, 32)],
    ids=lambda v: getattr(v, "name", str(v))
)
def test_asymmetric_grid_reproduces_almost_exactly(qtype, levels, sub):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, levels + 1, size=(4, 512))
    codes.reshape(-1, sub)[:, :2] = [0, levels]  # each sub-block spans the whole grid
    weights = (codes * 0.5 - 3.0).astype(np.float32)  # step 0.5, minimum -3
    decoded = gguf.quants.dequantize(quantize_kquant(weights, qtype), qtype)
    # only the fp16 super-block scales (max/15 or max/63) are inexact
    assert np.abs(decoded - weights).max() < 2e-3 * np.abs(weights).max()


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_shapes_and_sizes(qtype):
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    weights = np.random.default_rng(4).standard_normal((3, 768)).astype(np.float32)
    packed = quantize_kquant(weights, qtype)
    assert packed.shape == (3, 768 // 256 * type_size)
    assert packed.shape == gguf.quants.quant_shape_to_byte_shape(weights.shape, qtype)
    # leading dimensions and float64 input are fine, rows are independent
    stacked = quantize_kquant(weights.astype(np.float64).reshape(3, 1, 768), qtype)
    assert stacked.shape == (3, 1, 3 * type_size)
    assert np.array_equal(stacked.reshape(3, -1), packed)
    assert np.array_equal(quantize_kquant(weights[1:2], qtype), packed[1:2])


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_rows_must_be_multiples_of_256(qtype):
    with pytest.raises(ValueError, match=r"multiple of 256.*Q4_0"):
        quantize_kquant(np.zeros((2, 576), np.float32), qtype)


def test_bad_types_and_values():
    assert set(KQUANT_PACKERS) == set(KTYPES)
    with pytest.raises(ValueError, match="no k-quant packer for Q4_0"):
        quantize_kquant(np.zeros((1, 256), np.float32), T.Q4_0)
    with pytest.raises(ValueError, match="NaN or inf"):
        quantize_kquant(np.full((1, 256), np.nan, np.float32), T.Q6_K)
