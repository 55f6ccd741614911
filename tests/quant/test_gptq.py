"""GPTQ fidelity: the math against plain references, and which signals calibrate which linear."""

from __future__ import annotations

import copy
import importlib.util
from dataclasses import replace

import pytest
import torch

import engine.quant.gptq_pipeline as pipeline
from engine.core.architectures import architecture_for
from engine.core.data import DataSpec, TokenWindows
from engine.core.models import LoadedModel, weights_fingerprint
from engine.quant.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_shared, gram, prepare_hessian
from engine.quant.gptq_pipeline import linear_stages
from engine.quant.grid import (
    QuantizerSpec,
    apply_grid,
    effective_group_size,
    grid_params,
    quantize_to_grid,
    rtn_quantize,
)
from engine.quant.quantize_model import quantize_model
from tests.tiny_models import TINY_FACTORIES

ORDERS = [(False, "static"), (False, "dynamic"), (True, "static"), (True, "dynamic")]


def _hessian(inp: int, n: int = 600, seed: int = 1) -> torch.Tensor:
    """Hessian of correlated inputs with unequal scales (so act-order really permutes)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=generator) / inp**0.5 + torch.eye(inp)
    scale = torch.logspace(-1, 1, inp)[torch.randperm(inp, generator=generator)]
    acc = HessianAccumulator(inp)
    acc.add((torch.randn(n, inp, generator=generator) @ mix) * scale)
    return acc.hessian()


def _gptq(bits=3, group_size=32, act_order=False, group_params="static", zero_point="integer"):
    return QuantizerSpec(method="gptq", bits=bits, group_size=group_size, act_order=act_order,
                         group_params=group_params, zero_point=zero_point)


def reference_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """Plain GPTQ, one column at a time with full fp64 updates (no blocks): codes ``[out, in]``."""
    prepared = prepare_hessian(hessian, spec.damp, spec.act_order)
    w = weight.double().clone()
    inp = w.shape[1]
    gs = effective_group_size(inp, spec.group_size)
    perm = prepared.perm if prepared.perm is not None else torch.arange(inp)
    rtn = rtn_quantize(weight, spec.with_bits(spec.bits))
    column_scale = rtn.scales.double()[:, torch.arange(inp) // gs][:, perm]
    column_zero = rtn.zeros.double()[:, torch.arange(inp) // gs][:, perm]
    w, u = w[:, perm], prepared.hinv
    codes = torch.zeros_like(w)
    for i in range(inp):
        if spec.group_params == "static":
            scale, zero = column_scale[:, i], column_zero[:, i]
        elif i % gs == 0:
            scale, zero = (t.double() for t in grid_params(w[:, i : i + gs], spec.bits, spec.zero_point))
        codes[:, i] = quantize_to_grid(w[:, i], scale, zero, spec.bits, spec.zero_point)
        error = (w[:, i] - apply_grid(codes[:, i].clone(), scale, zero, spec.zero_point)) / u[i, i]
        w[:, i:] -= error[:, None] * u[i, i:][None, :]
    return codes[:, torch.argsort(perm)]


# --- the column loop ---------------------------------------------------------------

@pytest.mark.parametrize("width", [40, 300, 577])
def test_the_blocked_gram_product_is_x_transpose_x(width):
    x = torch.randn(50, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    product = gram(x)
    torch.testing.assert_close(product, x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("act_order, group_params", ORDERS)
@pytest.mark.parametrize("group_size", [40, None])  # 40 does not divide 150: the last group is shorter
@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_blocked_kernel_equals_the_column_by_column_reference(act_order, group_params, group_size, zero_point):
    generator = torch.Generator().manual_seed(2)
    weight, hessian = torch.randn(20, 150, generator=generator) * 0.05, _hessian(150)
    spec = _gptq(3, group_size, act_order, group_params, zero_point)
    expected = reference_gptq(weight, hessian, spec)
    # small blocks and sub-blocks, so every update path (rank-1, sub-block, block) is exercised
    exact = gptq_quantize_shared([weight], hessian, [spec], block_size=40, sub_block=8, dtype=torch.float64)[0]
    assert torch.equal(exact.codes.double(), expected)
    default = gptq_quantize(weight, hessian, spec)  # fp32 loop: float summation order may flip a rare code
    assert float((default.codes.double() != expected).float().mean()) <= 0.005


def test_weights_sharing_an_input_are_quantized_together_exactly_as_alone():
    generator = torch.Generator().manual_seed(3)
    hessian = _hessian(64)
    first, second = torch.randn(16, 64, generator=generator), torch.randn(8, 64, generator=generator)
    specs = [_gptq(4, 16, True), _gptq(2, 16, True)]
    together = gptq_quantize_shared([first, second], hessian, specs, dtype=torch.float64)
    for weight, spec, joint in zip((first, second), specs, together):
        alone = gptq_quantize_shared([weight], hessian, [spec], dtype=torch.float64)[0]
        assert joint.bits == spec.bits and torch.equal(joint.codes, alone.codes)
        assert torch.equal(joint.scales, alone.scales) and torch.equal(joint.zeros, alone.zeros)


@pytest.mark.parametrize("act_order, group_params", ORDERS)
@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_a_weight_already_on_the_grid_stays_unchanged(act_order, group_params, zero_point):
    generator = torch.Generator().manual_seed(4)
    out, inp, gs, bits = 12, 96, 32, 3
    codes = torch.randint(0, 8, (out, inp // gs, gs), generator=generator).float()
    codes[..., 0], codes[..., 1] = 0, 7  # every group spans the whole grid, so its grid is found again
    scale = (torch.rand(out, inp // gs, 1, generator=generator) * 0.02 + 0.01).half().float()
    if zero_point == "integer":
        zero = torch.randint(0, 8, (out, inp // gs, 1), generator=generator).float()
        weight = ((codes - zero) * scale).reshape(out, inp)
    else:
        weight = (codes * scale - (torch.rand(out, inp // gs, 1, generator=generator) * 0.05).half().float())
        weight = weight.reshape(out, inp)
    spec = _gptq(bits, gs, act_order, group_params, zero_point)
    assert torch.equal(rtn_quantize(weight, spec).dequantize(), weight)
    kept = torch.equal(gptq_quantize(weight, _hessian(inp), spec).dequantize(), weight)
    # dynamic act-order groups mix columns of different original groups: their grid is not the weight's
    # (why a model that was quantized before loses with it)
    assert kept == (not (act_order and group_params == "dynamic"))


@pytest.mark.parametrize("act_order, group_params", ORDERS)
@pytest.mark.parametrize("group_size", [32, None])
@pytest.mark.parametrize("zero_point", ["integer", "float"])
def test_an_identity_hessian_reduces_gptq_to_rtn(act_order, group_params, group_size, zero_point):
    weight = torch.randn(24, 100, generator=torch.Generator().manual_seed(5)) * 0.05
    spec = _gptq(3, group_size, act_order, group_params, zero_point)
    gptq = gptq_quantize(weight, torch.eye(100) * 3.0, spec)
    rtn = rtn_quantize(weight, spec)
    assert torch.equal(gptq.codes, rtn.codes) and torch.equal(gptq.scales, rtn.scales)
    assert torch.equal(gptq.zeros, rtn.zeros) and torch.equal(gptq.dequantize(), rtn.dequantize())


def test_static_act_order_keeps_the_groups_of_the_unpermuted_weight():
    weight, hessian = torch.randn(24, 100, generator=torch.Generator().manual_seed(6)) * 0.05, _hessian(100)
    assert prepare_hessian(hessian, act_order=True).perm.tolist() != list(range(100))
    static = gptq_quantize(weight, hessian, _gptq(3, 32, act_order=True))
    rtn = rtn_quantize(weight, _gptq(3, 32))
    assert static.g_idx is None and torch.equal(static.group_index(), torch.arange(100) // 32)
    assert torch.equal(static.scales, rtn.scales) and torch.equal(static.zeros, rtn.zeros)
    assert not torch.equal(static.codes, rtn.codes)  # the codes do move: errors are compensated
    dynamic = gptq_quantize(weight, hessian, _gptq(3, 32, act_order=True, group_params="dynamic"))
    perm = prepare_hessian(hessian, act_order=True).perm
    assert torch.equal(dynamic.g_idx[perm].long(), torch.arange(100) // 32)  # groups follow the processing order


def test_dead_inputs_are_rounded_and_damping_recovers_a_singular_hessian():
    weight = torch.randn(8, 40, generator=torch.Generator().manual_seed(7)) * 0.05
    x = torch.randn(10, 40, generator=torch.Generator().manual_seed(8))  # 10 tokens: H has rank 10
    x[:, [3, 17]] = 0  # two inputs never active
    acc = HessianAccumulator(40)
    acc.add(x)
    q = gptq_quantize(weight, acc.hessian(), _gptq(4, 8))
    rtn = rtn_quantize(weight, _gptq(4, 8))
    assert torch.isfinite(q.dequantize()).all()
    assert torch.equal(q.codes[:, 3], rtn.codes[:, 3])  # first column: nothing to compensate yet, and dead
    assert float(((weight - q.dequantize()) @ x.T).norm()) < float(((weight - rtn.dequantize()) @ x.T).norm())


# --- which signals calibrate which linear -------------------------------------------------

def _loaded(name: str) -> LoadedModel:
    model = TINY_FACTORIES[name]()
    return LoadedModel(model=model, tokenizer=None, architecture=architecture_for(model.config.model_type),
                       source="tiny", device=torch.device("cpu"), dtype=torch.float32,
                       fingerprint=weights_fingerprint(model))


def _windows(n=6, seqlen=32, seed=3):
    ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, DataSpec(split="calibration", seqlen=seqlen, n_windows=n))


def _recorded_hessians(monkeypatch, loaded, spec, bits, **kwargs):
    """Run quantize_model and return (the model, the Hessians GPTQ was given, in call order)."""
    seen = []

    def spy(weights, hessian, specs, **kw):
        seen.append(hessian.clone())
        return gptq_quantize_shared(weights, hessian, specs, **kw)

    monkeypatch.setattr(pipeline, "gptq_quantize_shared", spy)
    qm = quantize_model(loaded, bits, _windows(), spec=spec, use_cache=False, **kwargs)
    return qm.model, seen


@torch.no_grad()
def _input_hessians(model, arch, windows):
    """Hessian ``2/n Σ x xᵀ`` of the input of every linear group of every layer of ``model``, in order."""
    accumulators, handles = [], []
    for layer in arch.decoder_layers(model):
        linears = arch.layer_linears(layer)
        for stage in linear_stages(arch):
            acc = HessianAccumulator(linears[stage[0]].in_features)
            accumulators.append(acc)
            handles.append(linears[stage[0]].register_forward_pre_hook(lambda _m, a, acc=acc: acc.add(a[0])))
    try:
        model(input_ids=windows.input_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [acc.hessian() for acc in accumulators]


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_sequential_gptq_calibrates_every_linear_on_the_quantized_model(monkeypatch, name):
    loaded = _loaded(name)
    arch = loaded.architecture
    spec = _gptq(2, 16, act_order=True)
    model, sequential = _recorded_hessians(monkeypatch, loaded, spec, [2, 2, 2])
    # every linear group saw exactly the inputs it gets in the final quantized model ...
    expected = _input_hessians(model, arch, _windows())
    assert len(sequential) == len(expected) == 3 * len(linear_stages(arch))
    for got, want in zip(sequential, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ... and not those of the dense model: only the very first group reads a signal no quantization touched
    _, dense = _recorded_hessians(monkeypatch, loaded, replace(spec, propagation="dense"), [2, 2, 2])
    dense_expected = _input_hessians(loaded.model, arch, _windows())
    for got, want in zip(dense, dense_expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sequential[0], dense[0], rtol=1e-5, atol=1e-6)
    for seq, den in zip(sequential[1:], dense[1:]):
        assert not torch.allclose(seq, den, rtol=1e-3, atol=1e-5)


def test_one_pass_per_group_with_small_batches_sees_the_same_signals(monkeypatch):
    loaded = _loaded("qwen2")
    spec = _gptq(3, 16, act_order=True)
    _, one_batch = _recorded_hessians(monkeypatch, loaded, spec, [3, 3, 3])
    _, small = _recorded_hessians(monkeypatch, loaded, spec, [3, 3, 3], batch_size=2)
    assert len(one_batch) == len(small)
    for a, b in zip(one_batch, small):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- optional live cross-checks against llm-compressor ----------------------------------
# Run with the reference venv (bench/gptq_reference.py says how to make it):
#   .venv-ref/bin/python -m pytest tests/quant/test_gptq.py -k llm_compressor

needs_llm_compressor = pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is None,
                                          reason="llmcompressor is not installed (see bench/gptq_reference.py)")


def _output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sqrt(tr((W - Q) H (W - Q)ᵀ))``: the output error GPTQ minimises, from the Hessian alone."""
    return float(((weight - quantized).double() @ torch.linalg.cholesky(hessian.double())).norm())


@needs_llm_compressor
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_matches_llm_compressors_quantize_weight(bits, act_order):  # pragma: no cover - optional package
    """One weight, Hessian and grid through llm-compressor's GPTQ kernel and ours: the same weights out.

    Our static grid (the RTN grid of the unpermuted weight) is handed to
    theirs (our codes ``0..2^b-1`` with zero ``z`` are its signed codes with
    zero ``z - 2^(b-1)``), both run in fp32, so only float summation order
    differs (our damping is added in fp64, our updates are blocked by 16 and
    128 columns): a weight sitting on a rounding boundary may round the
    other way, and then its row's later updates differ a little.  Measured:
    every code equal and equal output errors.  Allowed: 0.5% of the weights
    on another grid point and 1% on the output error (GPTQ's gain over RTN
    here is 18-30%).
    """
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    weight, hessian = torch.randn(48, 160, generator=torch.Generator().manual_seed(2)) * 0.05, _hessian(160)
    spec = _gptq(bits, 32, act_order)
    ours = gptq_quantize(weight, hessian, spec)
    grid = rtn_quantize(weight, spec)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=32,
                            actorder="static" if act_order else None)
    theirs, _, fallback = quantize_weight(weight[None].clone(), hessian.float()[None], grid.scales.float()[None],
                                          (grid.zeros.float() - 2 ** (bits - 1))[None], None, args,
                                          blocksize=128, percdamp=spec.damp)
    assert not bool(fallback.any())
    scale = grid.scales.float()[:, torch.arange(160) // 32]
    same = ((theirs[0] - ours.dequantize()).abs() < 0.5 * scale).float().mean()
    assert float(same) >= 0.995
    mine, reference = (_output_error(weight, q, hessian) for q in (ours.dequantize(), theirs[0]))
    assert mine <= 1.01 * reference
    assert reference < _output_error(weight, grid.dequantize(), hessian)  # their kernel did run GPTQ


def _llm_compressor_gptq(folder: str, ids: torch.Tensor, bits: int, group_size: int):
    """llm-compressor's GPTQ (asymmetric, static act-order, damping 0.01, sequential pipeline) of ``folder``."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": group_size}
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], dampening_frac=0.01, actorder="static",
                          config_groups={"group": {"targets": ["Linear"], "weights": weights}})
    oneshot(model=model, tokenizer=AutoTokenizer.from_pretrained(folder), recipe=recipe,
            dataset=Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}),
            num_calibration_samples=ids.shape[0], max_seq_length=ids.shape[1], pipeline="sequential",
            shuffle_calibration_samples=False)
    return model


def _hidden(model, ids) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states[1:]


def _same_grid_point(theirs_linear, ours: torch.Tensor, group_size: int) -> float:
    scale = theirs_linear.weight_scale.detach()[:, torch.arange(ours.shape[1]) // group_size]
    return float(((theirs_linear.weight.detach() - ours).abs() < 0.5 * scale).float().mean())


@needs_llm_compressor
def test_matches_llm_compressor_on_a_tiny_llama(tiny_folder):  # pragma: no cover - optional package
    """LayerLab's GPTQ against llm-compressor's, end to end, 4 bits, group 32, static act-order, damping 0.01.

    1. With llm-compressor's propagation (every linear of a layer calibrated
       on the layer's dense weights, the quantized layer feeding the next)
       the two are the same algorithm.  Layer 0 reads identical inputs in
       both: at least 95% of its weights must land on the same grid point.
       Not 100%: their scales are fp32, ours rounded up to fp16 (up to 2^-10
       larger), which moves rounding boundaries by up to 1.5% of a step at
       4 bits; a weight rounded the other way changes its row's later
       updates (measured 98.0-99.9%; RTN shares only 81-90% with them).  On
       the calibration windows every layer's output must be closer to
       theirs than half their own distance to dense (measured 0.24-0.38;
       RTN: 1.3-1.8).
    2. LayerLab's default ("true sequential" inside a layer too: o sees the
       quantized q/k/v, ...) is a different, intended order: it must be no
       further from dense than theirs, within 10%, on the calibration
       windows and on held-out ones (measured 0.95-1.01 and 0.80-1.01).
    """
    from bench.gptq_reference import layerwise_propagation
    from engine.core.models import load_model

    bits, group = 4, 32
    ids = torch.randint(0, 1000, (8, 64), generator=torch.Generator().manual_seed(3))
    probe = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(11))
    theirs = _llm_compressor_gptq(tiny_folder, ids, bits, group)
    loaded = load_model(tiny_folder)
    arch = loaded.architecture
    windows = TokenWindows(ids, DataSpec(split="calibration", seqlen=ids.shape[1], n_windows=ids.shape[0]))
    spec = _gptq(bits, group, act_order=True)
    with layerwise_propagation():
        same_order = quantize_model(loaded, [bits] * loaded.num_layers, windows, spec=spec, use_cache=False)
    ours = quantize_model(loaded, [bits] * loaded.num_layers, windows, spec=spec, use_cache=False)
    clean = copy.deepcopy(loaded.model)  # their weights in a plain model (no quantization wrappers)
    with torch.no_grad():
        for name, param in clean.named_parameters():
            param.copy_(theirs.get_parameter(name))

    their_layer0 = arch.layer_linears(arch.decoder_layers(theirs)[0])
    for name, linear in their_layer0.items():
        assert _same_grid_point(linear, same_order.weights[0][name].dequantize(), group) >= 0.95, name
    dense, reference, mine = (_hidden(m, ids) for m in (loaded.model, clean, same_order.model))
    for d, r, m in zip(dense, reference, mine):
        assert float((m - r).norm()) <= 0.5 * float((r - d).norm())

    for tokens in (ids, probe):
        dense, reference, default = (_hidden(m, tokens) for m in (loaded.model, clean, ours.model))
        for d, r, m in zip(dense, reference, default):
            assert float((m - d).norm()) <= 1.1 * float((r - d).norm())


# --- the built-in model ------------------------------------------------------------

@pytest.mark.slow
def test_builtin_gptq_beats_rtn_clearly_at_3_bits(builtin):
    """docs/methods.md §10 setup with fewer tokens: sequential static act-order GPTQ at 3 bits, group 128.

    The methods' 16 × 512 calibration gives 0.56 × RTN's perplexity on 8 evaluation windows (llm-compressor:
    0.52); the 32 × 128 used here (a third of the time) on 4 × 256 evaluation windows measures 0.717 × (65.2 vs
    91.0, the same over thread counts): the bound is 0.75 × (GPTQ still a quarter better).
    """
    from engine.core.data import token_windows
    from engine.evaluation.perplexity import perplexity

    calibration = token_windows(DataSpec("wiki-offline", "calibration", 128, 32), builtin.tokenizer)
    evaluation = token_windows(DataSpec("wiki-offline", "evaluation", 256, 4), builtin.tokenizer)
    bits = [3] * builtin.num_layers
    rtn = quantize_model(builtin, bits, spec=QuantizerSpec(bits=3, group_size=128), use_cache=False)
    gptq = quantize_model(builtin, bits, calibration, spec=_gptq(3, 128, act_order=True), use_cache=False)
    assert gptq.weights[0]["q"].g_idx is None and gptq.size().bits_per_weight == rtn.size().bits_per_weight
    assert perplexity(gptq.model, evaluation).ppl < 0.75 * perplexity(rtn.model, evaluation).ppl
