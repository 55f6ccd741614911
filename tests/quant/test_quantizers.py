"""Quantizer math, storage format, bit allocation and size arithmetic (no model wiring)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.quant.allocation import (
    AllocationError,
    allocate_average,
    allocate_fraction,
    allocate_fractions,
    layer_order,
    uniform_allocation,
)
from engine.quant.files import (
    CorruptFileError,
    pack_codes,
    read_checked,
    unpack_codes,
    weight_config,
    weight_from_tensors,
    weight_to_tensors,
    write_checked,
)
from engine.quant.gptq import HessianAccumulator, gptq_quantize
from engine.quant.grid import QuantizationError, QuantizerSpec, rtn_quantize, weight_storage_bits


def _weight(out=24, inp=100, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=generator) * 0.05
    w[0, 3] = 0.9  # an outlier, as real weights have
    return w


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", [32, 40, None])  # 40 does not divide 100: last group is shorter
@pytest.mark.parametrize("zero_point", ["integer", "float", "symmetric"])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, zero_point):
    w = _weight()
    q = rtn_quantize(w, QuantizerSpec(bits=bits, group_size=group_size, zero_point=zero_point))
    assert q.codes.dtype == torch.uint8 and int(q.codes.max()) <= 2**bits - 1
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    if zero_point == "integer":
        assert torch.equal(q.zeros.float(), q.zeros.float().round())
    if zero_point == "symmetric":  # the middle code, the same for every group; not stored
        assert bool((q.zeros.float() == 2 ** (bits - 1)).all())
    assert q.n_groups == (1 if group_size is None else math.ceil(100 / group_size))
    step = q.scales.float()[:, q.group_index()]
    err = (w - q.dequantize()).abs()
    assert bool((err <= step / 2 * (1 + 1e-5) + 1e-8).all())


def test_float_zero_points_reproduce_a_q4_1_model_exactly():
    # GGUF Q4_1: blocks of 32 inputs, w = d * q + m with fp16 d and m, codes 0..15 (both ends used)
    generator = torch.Generator().manual_seed(5)
    d = (torch.rand(16, 4, 1, generator=generator) * 0.01 + 1e-3).half().float()
    m = (-torch.rand(16, 4, 1, generator=generator) * 0.1).half().float()
    q = torch.randint(0, 16, (16, 4, 32), generator=generator).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + m).reshape(16, 128)
    float_zero = rtn_quantize(w, QuantizerSpec(bits=4, group_size=32, zero_point="float"))
    assert torch.equal(float_zero.dequantize(), w)
    integer_zero = rtn_quantize(w, QuantizerSpec(bits=4, group_size=32))
    assert not torch.equal(integer_zero.dequantize(), w)  # its grid points are multiples of the scale


def test_more_bits_means_less_error():
    w = _weight()
    errors = [float((w - rtn_quantize(w, QuantizerSpec(bits=b, group_size=32)).dequantize()).norm())
              for b in range(2, 9)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-2 * float(w.norm())


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"bits": 1}, "from 2 to 8"),
        ({"bits": 9}, "from 2 to 8"),
        ({"bits": 3.5}, "from 2 to 8"),
        ({"group_size": 0}, "positive number"),
        ({"group_size": -128}, "positive number"),
        ({"method": "awq"}, "Choose one of rtn, gptq, llama.cpp"),
        ({"act_order": True}, "only applies to GPTQ"),
        ({"method": "gptq", "damp": 0.0}, "damping"),
        ({"zero_point": "asymmetric"}, "integer, float, symmetric"),
        ({"method": "gptq", "group_params": "per-row"}, "'static' or 'dynamic'"),
        ({"method": "gptq", "propagation": "layerwise"}, "'sequential' or 'dense'"),
    ],
)
def test_bad_specs_are_refused_with_advice(kwargs, words):
    with pytest.raises(QuantizationError, match=words):
        QuantizerSpec(**kwargs)
    assert issubclass(QuantizationError, ValueError)


def _correlated_inputs(n=1024, inp=100, seed=1):
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=generator) / inp**0.5 + torch.eye(inp)
    scale = torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=generator)]
    return (torch.randn(n, inp, generator=generator) @ mix) * scale


@pytest.mark.parametrize("bits, act_order", [(3, False), (4, False), (2, True), (3, True), (4, True)])
@pytest.mark.parametrize("zero_point", ["integer", "float"])
@pytest.mark.parametrize("group_params", ["static", "dynamic"])
def test_gptq_reconstructs_outputs_better_than_rtn(bits, act_order, zero_point, group_params):
    # (2 bits without act-order is about even with RTN on this synthetic layer: 166 vs 164)
    w, x = _weight(), _correlated_inputs()
    acc = HessianAccumulator(100)
    for chunk in x.split(300):
        acc.add(chunk)
    spec = QuantizerSpec(method="gptq", bits=bits, group_size=32, act_order=act_order, zero_point=zero_point,
                         group_params=group_params)
    gptq = gptq_quantize(w, acc.hessian(), spec)
    rtn = rtn_quantize(w, QuantizerSpec(bits=bits, group_size=32, zero_point=zero_point))
    gptq_err = float(((w - gptq.dequantize()) @ x.T).norm())
    rtn_err = float(((w - rtn.dequantize()) @ x.T).norm())
    assert gptq_err < rtn_err
    assert int(gptq.codes.max()) <= 2**bits - 1 and gptq.scales.shape == rtn.scales.shape
    assert (gptq.g_idx is not None) == (act_order and group_params == "dynamic") == spec.stores_group_index


def test_gptq_grid_is_the_rtn_grid_and_storage_round_trips():
    w, x = _weight(), _correlated_inputs()
    acc = HessianAccumulator(100)
    acc.add(x)
    q = gptq_quantize(w, acc.hessian(), QuantizerSpec(method="gptq", bits=3, group_size=40, act_order=True,
                                                      group_params="dynamic"))
    deq = q.dequantize()
    index = q.group_index()
    expected = (q.codes.float() - q.zeros.float()[:, index]) * q.scales.float()[:, index]
    assert torch.equal(deq, expected)
    back = weight_from_tensors(weight_to_tensors(q, "x"), "x", weight_config(q))
    assert torch.equal(back.dequantize(), deq) and torch.equal(back.g_idx, q.g_idx)
    f = rtn_quantize(w, QuantizerSpec(bits=3, group_size=40, zero_point="float"))
    expected = f.codes.float() * f.scales.float()[:, f.group_index()] + f.zeros.float()[:, f.group_index()]
    assert torch.equal(f.dequantize(), expected)
    back = weight_from_tensors(weight_to_tensors(f, "x"), "x", weight_config(f))
    assert back.zero_point == "float" and torch.equal(back.dequantize(), expected)
    sym = rtn_quantize(w, QuantizerSpec(bits=3, group_size=40, zero_point="symmetric"))
    stored = weight_to_tensors(sym, "x")
    assert "x.zeros" not in stored  # the zero is 2**(bits-1): not stored
    back = weight_from_tensors(stored, "x", weight_config(sym))
    assert back.zero_point == "symmetric" and torch.equal(back.dequantize(), sym.dequantize())
    # each group's codes use the grid of that group: the ranges include zero
    assert bool((q.zeros.float() >= 0).all() and (q.zeros.float() <= 7).all())


@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("zero_point", ["integer", "float", "symmetric"])
@pytest.mark.parametrize("act_order", [False, True])  # static groups: act-order only changes the column order
def test_gptq_with_a_diagonal_hessian_is_rtn(group_size, zero_point, act_order):
    w = _weight()
    hessian = torch.diag(torch.rand(100) + 0.5)  # uncorrelated inputs: no error to spread
    gptq = gptq_quantize(w, hessian, QuantizerSpec(method="gptq", bits=3, group_size=group_size,
                                                   zero_point=zero_point, act_order=act_order))
    rtn = rtn_quantize(w, QuantizerSpec(bits=3, group_size=group_size, zero_point=zero_point))
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)
    assert torch.equal(gptq.zeros, rtn.zeros)


def test_gptq_needs_tokens():
    with pytest.raises(QuantizationError, match="calibration"):
        HessianAccumulator(8).hessian()


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_is_dense_and_lossless(bits):
    codes = torch.randint(0, 2**bits, (7, 13), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(7 * 13 * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, 7 * 13).reshape(7, 13), codes)


def test_checked_file_detects_damage(tmp_path):
    path = tmp_path / "w.safetensors"
    write_checked(path, {"a": torch.arange(1000, dtype=torch.float16)}, {"k": 1})
    tensors, info = read_checked(path)
    assert info == {"k": 1} and torch.equal(tensors["a"], torch.arange(1000, dtype=torch.float16))
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptFileError):
        read_checked(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptFileError):
        read_checked(path)
    assert not list(tmp_path.glob("*.tmp"))


def test_storage_bits_include_scales_and_zeros():
    assert weight_storage_bits(8, 256, 4, 128) / (8 * 256) == 4.25
    assert weight_storage_bits(8, 256, 2, 128) / (8 * 256) == 2.25
    assert weight_storage_bits(8, 256, 4, None) / (8 * 256) == 4 + 32 / 256
    assert weight_storage_bits(8, 576, 4, 128) / (8 * 576) == 4 + 5 * 32 / 576  # 576 = 4.5 groups -> 5
    assert weight_storage_bits(8, 256, 4, 128, group_index=True) == 8 * 256 * 4.25 + 256 * 32
    q = rtn_quantize(torch.randn(8, 256), QuantizerSpec(bits=4, group_size=128))
    assert q.bits_per_weight() == 4.25
    symmetric = rtn_quantize(torch.randn(8, 256), QuantizerSpec(bits=4, group_size=128, zero_point="symmetric"))
    assert symmetric.bits_per_weight() == 4 + 16 / 128  # scales only


def test_symmetric_grid_is_centred_on_zero():
    """Codes ``2**(bits-1) ± k`` dequantize to ``± k * scale``: a weight and its negation get mirrored codes."""
    w = _weight()
    w = torch.cat([w, -w])
    q = rtn_quantize(w, QuantizerSpec(bits=4, group_size=32, zero_point="symmetric"))
    half = w.shape[0] // 2
    assert torch.equal(q.scales[:half], q.scales[half:])
    top, bottom = q.dequantize()[:half], q.dequantize()[half:]
    clipped = q.codes[:half] == 15  # +max|w| may clip to the top code (the grid has one more negative step)
    assert torch.equal(top[~clipped & (q.codes[half:] != 0)], -bottom[~clipped & (q.codes[half:] != 0)])


# --- allocation -------------------------------------------------------------

IMPORTANCE = [0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4]  # least important: 1, 5, 3, 7, 0, ...


def test_order_by_importance_reversed_and_custom():
    order = layer_order(8, "importance", IMPORTANCE)
    assert order == [1, 5, 3, 7, 0, 4, 6, 2]
    assert layer_order(8, "reversed", IMPORTANCE) == order[::-1]
    assert layer_order(3, "importance", [1.0, 1.0, 0.0]) == [2, 0, 1]  # ties by index
    assert layer_order(4, "custom", permutation=[3, 1, 0, 2]) == [3, 1, 0, 2]
    with pytest.raises(AllocationError, match="exactly once"):
        layer_order(4, "custom", permutation=[0, 1, 1, 2])
    with pytest.raises(AllocationError, match="one score per layer"):
        layer_order(8, "importance", [1.0, 2.0])


def test_random_order_is_seeded():
    first = layer_order(30, "random", seed=7)
    assert first == layer_order(30, "random", seed=7) != layer_order(30, "random", seed=8)
    assert sorted(first) == list(range(30))


def test_target_average_325_from_4_and_2():
    order = layer_order(8, "importance", IMPORTANCE)
    alloc = allocate_average(order, [4, 2], 3.25)
    assert alloc.counts == {2: 3, 4: 5} and alloc.fractions[4] == 0.625
    assert alloc.average_bits == 3.25 and alloc.target_bits == 3.25
    assert [alloc.bits[i] for i in (1, 5, 3)] == [2, 2, 2]  # the least important go low first
    thirty = layer_order(30, "random", seed=0)
    down, nearest = allocate_average(thirty, [4, 2], 3.25), allocate_average(thirty, [4, 2], 3.25, "nearest")
    assert down.counts[4] == 18 and down.average_bits == 3.2  # never above the target
    assert nearest.counts[4] == 19 and math.isclose(nearest.average_bits, 2 + 2 * 19 / 30)


def test_target_average_with_more_levels_uses_the_bracketing_pair():
    order = list(range(8))
    alloc = allocate_average(order, [2, 3, 4, 8], 3.5)
    assert alloc.counts == {3: 4, 4: 4} and alloc.bits[:4] == (3, 3, 3, 3)
    assert allocate_average(order, [2, 4], 4).bits == (4,) * 8


@pytest.mark.parametrize("target", [1.5, 4.01, float("nan")])
def test_unreachable_target_is_refused(target):
    with pytest.raises(AllocationError, match="unreachable"):
        allocate_average(list(range(8)), [4, 2], target)


def test_fraction_at_low_level():
    order = layer_order(8, "importance", IMPORTANCE)
    alloc = allocate_fraction(order, 4, 3, 0.25)
    assert alloc.counts == {3: 2, 4: 6} and alloc.bits[1] == alloc.bits[5] == 3
    assert allocate_fraction(order, 4, 2, 0.0).bits == (4,) * 8
    assert allocate_fraction(order, 4, 2, 1.0).bits == (2,) * 8
    assert allocate_fraction(list(range(30)), 4, 2, 0.25).counts[2] == 8  # 7.5 layers -> 8
    with pytest.raises(AllocationError):
        allocate_fraction(order, 4, 2, 1.5)
    with pytest.raises(AllocationError, match="must not exceed"):
        allocate_fraction(order, 2, 4, 0.5)
    with pytest.raises(AllocationError, match="out of range"):
        allocate_fraction(order, 16, 4, 0.5)


def test_fractions_per_level_generalise_to_three_levels():
    order = layer_order(8, "importance", IMPORTANCE)
    alloc = allocate_fractions(order, {2: 0.25, 3: 0.25, 4: 0.5})
    assert alloc.counts == {2: 2, 3: 2, 4: 4}
    assert [alloc.bits[i] for i in order] == [2, 2, 3, 3, 4, 4, 4, 4]
    assert sum(allocate_fractions(list(range(7)), {2: 1 / 3, 3: 1 / 3, 4: 1 / 3}).counts.values()) == 7
    with pytest.raises(AllocationError, match="add up to 1"):
        allocate_fractions(order, {2: 0.5, 4: 0.4})
    assert uniform_allocation(5, 3).bits == (3,) * 5
