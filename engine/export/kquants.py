"""Numpy packers for the GGUF k-quant types that ``gguf.quants`` only dequantizes.

``gguf`` 0.19 can *read* Q2_K, Q3_K, Q4_K, Q5_K and Q6_K but has no quantizer
for them; :func:`quantize_kquant` writes them, byte for byte in ggml's layout,
so a mixed-bit export can give 2-bit layers Q2_K, 3-bit layers Q3_K and 6-bit
layers Q6_K (Q4_K and Q5_K are here too).

Every k-quant works on super-blocks of 256 weights (``QK_K``), so rows must be a
multiple of 256 long.  A super-block holds 16 sub-blocks of 16 weights (Q2_K,
Q3_K, Q6_K) or 8 of 32 (Q4_K, Q5_K), each with its own small integer scale
(and minimum for Q2_K/Q4_K/Q5_K), and one or two fp16 super-block scales::

    type  bytes/256  weight                          sub-block scale, min
    Q2_K   84        d*sc*q - dmin*m,  q in 0..3       4-bit sc, 4-bit m  (x16)
    Q3_K  110        d*sc*q,           q in -4..3      6-bit signed sc    (x16)
    Q4_K  144        d*sc*q - dmin*m,  q in 0..15      6-bit sc, 6-bit m  (x8)
    Q5_K  176        d*sc*q - dmin*m,  q in 0..31      6-bit sc, 6-bit m  (x8)
    Q6_K  210        d*sc*q,           q in -32..31    int8 sc            (x16)

The algorithm follows llama.cpp's reference quantizers (``quantize_row_q*_K_ref``
in ggml-quants.c), vectorised over all sub-blocks at once:

1. each sub-block gets a float scale (and minimum) from a small grid of
   candidate scales around ``range / levels``; for every candidate the codes
   are rounded and the scale (and minimum) refitted by least squares, and the
   candidate with the lowest *unweighted squared error* wins (llama.cpp
   weights its errors by ``|x|`` or ``x**2``; plain squared error is what the
   relative RMS error measures);
2. the sub-block scales are quantized against an fp16 super-block scale:
   ``max / 15`` (Q2_K), ``-max / 32`` (Q3_K, the sub-block with the largest
   ``|scale|`` gets -32), ``max / 63`` (Q4_K/Q5_K), ``-max / 128`` (Q6_K);
3. the codes are recomputed with the *quantized* scales and packed.  Unlike
   llama.cpp, the neighbouring scale codes (``sc - 1``, ``sc + 1``) are tried
   too and, for the types with a minimum, the min code is refitted to the
   codes; the lowest squared error wins (never worse than plain rounding).
   This matters next to outliers: in a super-block holding a 100-sigma
   weight the other sub-blocks' scales round to 0 or 1 step; with plain
   rounding (llama.cpp's reference) Q2_K decodes many of them to the
   constant ``-min`` (measured: relative RMS error 1.8 on those weights,
   worse than zeros; 0.8 with the extra candidates).

Internal ``_quantize(weights, qtype, want_dequant=True)`` also returns the
values ggml will compute from the bytes (used by the tests, which check that
``gguf.quants.dequantize`` reproduces them exactly).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np

QK_K = 256
T = gguf.GGMLQuantizationType
_CHUNK_BLOCKS = 512  # super-blocks per numpy pass: 131072 weights, 512 KiB per float32 temporary
_GROUP_MAX_EPS = 1e-15  # llama.cpp's "all zero" threshold for a sub-block
_F16_MAX = float(np.finfo(np.float16).max)

BlockQuantizer = Callable[[np.ndarray, bool], tuple[np.ndarray, np.ndarray | None]]


# ---------------------------------------------------------------------------
# per-sub-block scale search (sub-blocks are columns: x has shape (n, B))


def _fit_asymmetric(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and minimum per column of ``x`` (``(n, B)`` float32) for codes 0..nmax.

    Returns ``(scale, the_min)``, both ``(B,)`` float64 and >= 0 in the usual
    case, so that ``x ~= scale * L - the_min`` with integer ``L`` in 0..nmax.
    As in llama.cpp's ``make_qkx2_quants`` the minimum is clamped to <= 0 (the
    stored ``the_min`` to >= 0), and candidates are ``iscale = (nmax + rmin +
    rdelta*i) / (max - min)`` for ``i = 0..nstep`` plus ``nmax / (max - min)``.
    """
    n = x.shape[0]
    xmin = np.minimum(x.min(axis=0), 0.0)
    xmax = x.max(axis=0)
    rng = xmax - xmin
    flat = ~(rng > 0)
    rng = np.where(flat, 1.0, rng).astype(np.float32)
    shifted = x - xmin
    sum_x = x.sum(axis=0, dtype=np.float64)
    sum_xx = np.einsum("ij,ij->j", x, x, dtype=np.float64)

    codes = np.empty_like(x)

    def codes_for(iscale: np.ndarray) -> np.ndarray:
        np.multiply(shifted, iscale, out=codes)
        np.rint(codes, out=codes)
        return np.clip(codes, 0, nmax, out=codes)

    # first candidate: the plain min/max grid, no refit
    iscale = np.float32(nmax) / rng
    best_scale = (1.0 / iscale).astype(np.float64)
    best_min = xmin.astype(np.float64)
    L = codes_for(iscale)
    resid = L * best_scale.astype(np.float32) + best_min.astype(np.float32) - x
    best_err = np.einsum("ij,ij->j", resid, resid, dtype=np.float64)

    for step in range(nstep + 1):
        L = codes_for(np.float32(rmin + rdelta * step + nmax) / rng)
        s_l = L.sum(axis=0, dtype=np.float64)
        s_ll = np.einsum("ij,ij->j", L, L, dtype=np.float64)
        s_xl = np.einsum("ij,ij->j", x, L, dtype=np.float64)
        det = n * s_ll - s_l * s_l
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (n * s_xl - sum_x * s_l) / det
        mn = (s_ll * sum_x - s_l * s_xl) / det
        clamp = mn > 0
        mn = np.where(clamp, 0.0, mn)
        scale = np.where(clamp, s_xl / np.where(ok, s_ll, 1.0), scale)
        err = sum_xx - 2 * scale * s_xl - 2 * mn * sum_x + scale * scale * s_ll + 2 * scale * mn * s_l + n * mn * mn
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)

    best_scale = np.where(flat, 0.0, best_scale)
    best_min = np.where(flat, xmin, best_min)
    return best_scale, -best_min


def _fit_symmetric(x: np.ndarray, nmax: int, nsteps: int = 9, rdelta: float = 0.1) -> np.ndarray:
    """Signed scale per column of ``x`` (``(n, B)`` float32) for codes -nmax..nmax-1.

    Returns ``(B,)`` float64 with ``x ~= scale * L``.  As in llama.cpp's
    ``make_qx_quants`` the element of largest magnitude maps to about -nmax
    (the side with one more level), so the scale's sign is opposite to that
    element's; candidates are ``iscale = -(nmax + rdelta*i) / max`` for
    ``i = -nsteps..nsteps``, each refitted by least squares; all-zero columns
    get 0.
    """
    B = x.shape[1]
    absx = np.abs(x)
    where = absx.argmax(axis=0)
    peak = x[where, np.arange(B)]
    zero = ~(np.abs(peak) >= _GROUP_MAX_EPS)
    peak = np.where(zero, 1.0, peak).astype(np.float32)

    best_metric = np.full(B, -1.0)
    best_scale = np.zeros(B)
    codes = np.empty_like(x)
    for step in [0, *range(-nsteps, 0), *range(1, nsteps + 1)]:
        iscale = np.float32(-(nmax + rdelta * step)) / peak
        np.multiply(x, iscale, out=codes)
        np.rint(codes, out=codes)
        np.clip(codes, -nmax, nmax - 1, out=codes)
        s_xl = np.einsum("ij,ij->j", x, codes, dtype=np.float64)
        s_ll = np.einsum("ij,ij->j", codes, codes, dtype=np.float64)
        ok = s_ll > 0
        s_ll = np.where(ok, s_ll, 1.0)
        metric = np.where(ok, s_xl * s_xl / s_ll, -1.0)  # = error reduction of the least-squares scale
        better = metric > best_metric
        best_metric = np.where(better, metric, best_metric)
        best_scale = np.where(better, s_xl / s_ll, best_scale)
    return np.where(zero, 0.0, best_scale)


# ---------------------------------------------------------------------------
# helpers


def _f16(values: np.ndarray) -> np.ndarray:
    """float -> fp16, clamped to fp16's finite range (so huge weights saturate instead of becoming inf)."""
    return np.clip(values, -_F16_MAX, _F16_MAX).astype("<f2")


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """``(nb,)`` fp16 -> ``(nb, 2)`` uint8, little-endian as in ggml's structs."""
    return values.astype("<f2").view(np.uint8).reshape(-1, 2)


def _codes(x: np.ndarray, step: np.ndarray, offset: np.ndarray | None, lo: int, hi: int) -> np.ndarray:
    """Integer codes ``clip(rint((x + offset) / step), lo, hi)`` as float32; 0 where ``step == 0``.

    ``x``: ``(nb, nsub, sub)`` float32; ``step``, ``offset``: ``(nb, nsub)`` float32.
    """
    zero = step == 0
    safe = np.where(zero, np.float32(1), step)[..., None]
    q = x + offset[..., None] if offset is not None else x.copy()
    np.divide(q, safe, out=q)
    np.rint(q, out=q)
    np.clip(q, lo, hi, out=q)
    q[np.broadcast_to(zero[..., None], q.shape)] = 0
    return q


def _sq_err(x: np.ndarray, step: np.ndarray, q: np.ndarray, shift: np.ndarray | None) -> np.ndarray:
    """Squared error per sub-block ``(nb, nsub)`` of ``step * q - shift`` against ``x`` ``(nb, nsub, sub)``."""
    r = step[..., None] * q - x
    if shift is not None:
        r -= shift[..., None]
    return np.einsum("...i,...i->...", r, r)


def _pick_symmetric(
    x: np.ndarray, d: np.ndarray, sc0: np.ndarray, lo: int, hi: int, sc_lo: int, sc_hi: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-block scale codes and weight codes for ``x`` ``(nb, nsub, sub)`` (Q3_K, Q6_K).

    ``sc0`` (``(nb, nsub)`` ints) is the rounded scale code; its neighbours
    ``sc0 - 1`` and ``sc0 + 1`` are tried too (codes recomputed for each) and
    the one with the lowest squared error kept.  This matters when a
    super-block holds an outlier: the other sub-blocks' scales round to 0 or
    1 step, and 1 step (with requantized codes) is usually far better than 0.
    Returns ``(sc, step, q)``: int16 ``(nb, nsub)``, float32 ``d * sc``, float32 codes.
    """
    df = d.astype(np.float32)[:, None]
    best = None
    for delta in (0, -1, 1):
        sc = np.clip(sc0 + delta, sc_lo, sc_hi).astype(np.int16)
        step = df * sc.astype(np.float32)
        q = _codes(x, step, None, lo, hi)
        err = _sq_err(x, step, q, None)
        if best is None:
            best = [err, sc, step, q]
            continue
        better = err < best[0]
        best = [np.where(better, err, best[0]), np.where(better, sc, best[1]), np.where(better, step, best[2]),
                np.where(better[..., None], q, best[3])]
    return best[1], best[2], best[3]


def _pick_asymmetric(
    x: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc0: np.ndarray, m0: np.ndarray, nmax: int, levels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Scale codes, min codes and weight codes for ``x`` ``(nb, nsub, sub)`` (Q2_K, Q4_K, Q5_K).

    Candidates: the rounded codes ``(sc0, m0)`` as llama.cpp uses them, and
    for each scale code in ``sc0 - 1 .. sc0 + 1`` the min code refitted to
    the codes (least-squares offset, rounded to the ``dmin`` grid, codes
    recomputed).  The lowest squared error wins; in particular a sub-block
    whose scale rounds to 0 gets the min code nearest its mean instead of an
    unrelated minimum.  Returns ``(sc, m, step, shift, q)``: uint8 codes
    ``(nb, nsub)``, float32 ``d * sc`` and ``dmin * m``, float32 codes.
    """
    df = d.astype(np.float32)[:, None]
    mf = dmin.astype(np.float32)[:, None]
    has_min = mf > 0
    mf_safe = np.where(has_min, mf, np.float32(1))
    sc0 = sc0.astype(np.int16)
    best = None
    for delta in (None, 0, -1, 1):
        sc = np.clip(sc0 + (delta or 0), 0, levels).astype(np.uint8)
        step = df * sc.astype(np.float32)
        m = m0
        shift = mf * m.astype(np.float32)
        q = _codes(x, step, shift, 0, nmax)
        if delta is not None:  # refit the min to these codes
            offset = (step[..., None] * q - x).mean(axis=-1)
            m = np.where(has_min, np.clip(np.rint(offset / mf_safe), 0, levels), 0).astype(np.uint8)
            shift = mf * m.astype(np.float32)
            q = _codes(x, step, shift, 0, nmax)
        err = _sq_err(x, step, q, shift)
        if best is None:
            best = [err, sc, m, step, shift, q]
            continue
        better = err < best[0]
        best = [np.where(better, err, best[0]), np.where(better, sc, best[1]), np.where(better, m, best[2]),
                np.where(better, step, best[3]), np.where(better, shift, best[4]),
                np.where(better[..., None], q, best[5])]
    return best[1], best[2], best[3], best[4], best[5]


def _or_shifted(parts: np.ndarray, shifts: list[int], axis: int) -> np.ndarray:
    """OR of ``parts`` (uint8) shifted left by ``shifts`` along ``axis`` (which is removed)."""
    shape = [1] * parts.ndim
    shape[axis] = len(shifts)
    return np.bitwise_or.reduce(parts << np.array(shifts, dtype=np.uint8).reshape(shape), axis=axis)


def _pack_2bit(low: np.ndarray) -> np.ndarray:
    """``(nb, 256)`` uint8 in 0..3 -> ``(nb, 64)``: byte ``32h + l`` holds weights ``128h + 32k + l`` at bits ``2k``."""
    return _or_shifted(low.reshape(-1, 2, 4, 32), [0, 2, 4, 6], axis=2).reshape(-1, 64)


def _pack_nibbles_k4(low: np.ndarray) -> np.ndarray:
    """``(nb, 256)`` uint8 in 0..15 -> ``(nb, 128)`` as Q4_K/Q5_K:
    byte ``32c + l`` = weight ``64c + l`` | weight ``64c + 32 + l`` << 4."""
    q = low.reshape(-1, 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)


def _pack_high_bits(bit: np.ndarray) -> np.ndarray:
    """``(nb, 256)`` uint8 in 0..1 -> ``(nb, 32)``: bit ``k`` of byte ``l`` is weight ``32k + l``
    (Q3_K hmask, Q5_K qh)."""
    return _or_shifted(bit.reshape(-1, 8, 32), list(range(8)), axis=1)


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins ``(nb, 8)`` uint8 -> Q4_K/Q5_K's 12 bytes
    (see ``gguf.quants.Q4_K.get_scale_min``)."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0xF) | ((mn[:, 4:] & 0xF) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _pack_scales_q3(s6: np.ndarray) -> np.ndarray:
    """Sixteen 6-bit values ``(nb, 16)`` uint8 (signed scale + 32) -> Q3_K's 12 bytes.

    Bytes 0..7: low nibbles of scales ``j`` (bits 0-3) and ``j + 8`` (bits 4-7);
    byte ``8 + i``: the top two bits of scales ``i, i+4, i+8, i+12`` at bits 0, 2, 4, 6.
    """
    low = (s6[:, :8] & 0xF) | ((s6[:, 8:] & 0xF) << 4)
    high = _or_shifted((s6 >> 4).reshape(-1, 4, 4), [0, 2, 4, 6], axis=1)
    return np.concatenate([low, high], axis=1)


def _sub_columns(x: np.ndarray, sub: int) -> np.ndarray:
    """``(nb, 256)`` -> ``(sub, nb * 256 // sub)``: one column per sub-block (fast column reductions)."""
    return np.ascontiguousarray(x.reshape(-1, sub).T)


def _signed_superblock(scales: np.ndarray, levels: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize signed sub-block scales ``(nb, nsub)`` against one fp16 scale per block.

    The scale of largest magnitude maps to ``-levels`` (llama.cpp's trick to use
    the extra negative level); returns ``(d (nb,) fp16, sc (nb, nsub) int in -levels..hi)``.
    """
    pick = np.abs(scales).argmax(axis=1)
    top = scales[np.arange(scales.shape[0]), pick]
    zero = ~(np.abs(top) >= _GROUP_MAX_EPS)
    iscale = -levels / np.where(zero, 1.0, top)
    sc = np.clip(np.rint(iscale[:, None] * scales), -levels, hi)
    sc[zero] = 0
    d = _f16(np.where(zero, 0.0, 1.0 / iscale))
    return d, sc.astype(np.int16)


def _unsigned_superblock(values: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Quantize non-negative ``(nb, nsub)`` values to 0..levels against ``max / levels`` in fp16."""
    top = values.max(axis=1)
    pos = top > 0
    iscale = np.where(pos, levels / np.where(pos, top, 1.0), 0.0)
    q = np.clip(np.rint(iscale[:, None] * values), 0, levels).astype(np.uint8)
    d = _f16(np.where(pos, top / levels, 0.0))
    return d, q


# ---------------------------------------------------------------------------
# one chunk of super-blocks: x (nb, 256) float32 -> (bytes (nb, type_size), dequantized (nb, 256) or None)


def _q2_k_blocks(x: np.ndarray, want_dequant: bool) -> tuple[np.ndarray, np.ndarray | None]:
    nb = x.shape[0]
    scale, the_min = _fit_asymmetric(_sub_columns(x, 16), 3, -0.5, 0.1, 15)
    d, sc = _unsigned_superblock(scale.reshape(nb, 16), 15)
    dmin, mq = _unsigned_superblock(the_min.reshape(nb, 16), 15)
    sc, mq, step, shift, q = _pick_asymmetric(x.reshape(nb, 16, 16), d, dmin, sc, mq, 3, 15)
    codes = _pack_2bit(q.astype(np.uint8).reshape(nb, 256))
    packed = np.concatenate([sc | (mq << 4), codes, _f16_bytes(d), _f16_bytes(dmin)], axis=1)
    deq = (step[..., None] * q - shift[..., None]).reshape(nb, 256) if want_dequant else None
    return packed, deq


def _q3_k_blocks(x: np.ndarray, want_dequant: bool) -> tuple[np.ndarray, np.ndarray | None]:
    nb = x.shape[0]
    scale = _fit_symmetric(_sub_columns(x, 16), 4)
    d, sc = _signed_superblock(scale.reshape(nb, 16), 32, 31)
    sc, step, q = _pick_symmetric(x.reshape(nb, 16, 16), d, sc, -4, 3, -32, 31)
    u = (q + 4).astype(np.uint8).reshape(nb, 256)  # 0..7: hmask bit set <=> q >= 0
    scales = _pack_scales_q3((sc + 32).astype(np.uint8))
    packed = np.concatenate([_pack_high_bits(u >> 2), _pack_2bit(u & 3), scales, _f16_bytes(d)], axis=1)
    deq = (step[..., None] * q).reshape(nb, 256) if want_dequant else None
    return packed, deq


def _q6_k_blocks(x: np.ndarray, want_dequant: bool) -> tuple[np.ndarray, np.ndarray | None]:
    nb = x.shape[0]
    scale = _fit_symmetric(_sub_columns(x, 16), 32)
    d, sc = _signed_superblock(scale.reshape(nb, 16), 128, 127)
    sc, step, q = _pick_symmetric(x.reshape(nb, 16, 16), d, sc, -32, 31, -128, 127)
    u = (q + 32).astype(np.uint8).reshape(nb, 256)
    halves = u.reshape(nb, 2, 2, 64)  # [half, nibble slot, 64]
    ql = ((halves[:, :, 0] & 0xF) | ((halves[:, :, 1] & 0xF) << 4)).reshape(nb, 128)
    qh = _pack_2bit(u >> 4)
    packed = np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
    deq = (step[..., None] * q).reshape(nb, 256) if want_dequant else None
    return packed, deq


def _k45_blocks(x: np.ndarray, want_dequant: bool, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    nb = x.shape[0]
    nmax = (1 << bits) - 1
    scale, the_min = _fit_asymmetric(_sub_columns(x, 32), nmax, -1.0, 0.1, 20)
    d, sc = _unsigned_superblock(scale.reshape(nb, 8), 63)
    dmin, mq = _unsigned_superblock(the_min.reshape(nb, 8), 63)
    sc, mq, step, shift, q = _pick_asymmetric(x.reshape(nb, 8, 32), d, dmin, sc, mq, nmax, 63)
    u = q.astype(np.uint8).reshape(nb, 256)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _pack_scales_k4(sc, mq)]
    if bits == 5:
        parts.append(_pack_high_bits(u >> 4))
    parts.append(_pack_nibbles_k4(u & 0xF))
    deq = (step[..., None] * q - shift[..., None]).reshape(nb, 256) if want_dequant else None
    return np.concatenate(parts, axis=1), deq


_BLOCK_QUANTIZERS: dict[T, BlockQuantizer] = {
    T.Q2_K: _q2_k_blocks,
    T.Q3_K: _q3_k_blocks,
    T.Q4_K: lambda x, want: _k45_blocks(x, want, 4),
    T.Q5_K: lambda x, want: _k45_blocks(x, want, 5),
    T.Q6_K: _q6_k_blocks,
}


# ---------------------------------------------------------------------------
# public API


def _quantize(weights: np.ndarray, qtype: T, want_dequant: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Bytes and (if ``want_dequant``) the float32 weights ggml decodes from them, shaped like ``weights``."""
    try:
        qtype = T(qtype)
    except ValueError:
        raise ValueError(f"unknown GGML quantization type {qtype!r}") from None
    quantizer = _BLOCK_QUANTIZERS.get(qtype)
    if quantizer is None:
        have = ", ".join(t.name for t in _BLOCK_QUANTIZERS)
        raise ValueError(f"no k-quant packer for {qtype.name} (have {have}; use gguf.quants.quantize for the others)")
    values = np.asarray(weights, dtype=np.float32)
    if values.ndim == 0:
        raise ValueError("weights must have at least one dimension (rows of weights)")
    n = values.shape[-1]
    if n % QK_K != 0:
        raise ValueError(
            f"{qtype.name} needs rows whose length is a multiple of {QK_K} (got {n}); "
            "use a 32-element block type such as Q4_0, Q4_1, Q5_0, Q5_1 or Q8_0 instead"
        )
    if not np.isfinite(values).all():
        raise ValueError(f"weights to pack as {qtype.name} contain NaN or inf")
    type_size = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = values.reshape(-1, QK_K)
    packed = np.empty((blocks.shape[0], type_size), dtype=np.uint8)
    deq = np.empty(blocks.shape, dtype=np.float32) if want_dequant else None
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        part = slice(start, start + _CHUNK_BLOCKS)
        packed[part], chunk_deq = quantizer(blocks[part], want_dequant)
        if deq is not None:
            deq[part] = chunk_deq
    out_shape = (*values.shape[:-1], n // QK_K * type_size)
    return packed.reshape(out_shape), (deq.reshape(values.shape) if deq is not None else None)


def quantize_kquant(weights: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """Pack ``weights`` as the k-quant ``qtype`` (Q2_K, Q3_K, Q4_K, Q5_K or Q6_K).

    ``weights``: float (converted to float32), shape ``(rows, n)`` (any leading
    dimensions work) with ``n % 256 == 0``.  Returns uint8 ``(rows, n // 256 *
    type_size)`` in ggml's byte layout (``type_size`` = 84, 110, 144, 176, 210
    bytes per 256 weights), the same shape convention as
    ``gguf.quants.quantize`` for Q4_0 etc.; ``gguf.quants.dequantize(result,
    qtype)`` gives back ``(rows, n)`` float32.

    Raises ``ValueError`` when ``n`` is not a multiple of 256 (32-element block
    types such as Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 fit those rows), when ``qtype`` has no
    packer here, or when the weights contain NaN/inf.  Weights beyond about
    1e6 in magnitude saturate (the fp16 super-block scales are clamped to
    65504).
    """
    return _quantize(weights, qtype, want_dequant=False)[0]


def _packer(qtype: T) -> Callable[[np.ndarray], np.ndarray]:
    def pack(weights: np.ndarray) -> np.ndarray:
        return quantize_kquant(weights, qtype)

    pack.__name__ = f"pack_{qtype.name.lower()}"
    pack.__doc__ = (f"float32 (rows, n), n % 256 == 0 -> uint8 (rows, n // 256 * {gguf.GGML_QUANT_SIZES[qtype][1]}) "
                    f"as {qtype.name}.")
    return pack


#: qtype -> packer (float32 ``(rows, n)`` -> uint8 ``(rows, n // 256 * type_size)``)
KQUANT_PACKERS: dict[gguf.GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    qtype: _packer(qtype) for qtype in _BLOCK_QUANTIZERS
}
