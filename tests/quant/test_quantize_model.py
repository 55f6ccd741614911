"""Quantizing model copies: wiring, caches, size report, save/load, the built-in model."""

from __future__ import annotations

import json

import pytest
import torch

from engine.core.architectures import architecture_for
from engine.core.data import DataSpec, TokenWindows, token_windows
from engine.core.models import LoadedModel, weights_fingerprint
from engine.core.paths import FolderExistsError, cache_root
from engine.evaluation.perplexity import perplexity
from engine.quant.allocation import allocate_fraction, layer_order
from engine.quant.grid import QuantizationError, QuantizerSpec, rtn_quantize
from engine.quant.quantize_model import (
    clear_memory_cache,
    layer_weights,
    prepare_levels,
    quantize_model,
    size_report,
)
from engine.quant.save import load_quantized, save_quantized
from tests.tiny_models import TINY_FACTORIES

RTN = QuantizerSpec(method="rtn", group_size=32)
GPTQ = QuantizerSpec(method="gptq", group_size=40, act_order=True)  # 40 does not divide 64 or 96; sequential
DENSE_GPTQ = QuantizerSpec(method="gptq", group_size=40, act_order=True, propagation="dense")


def _loaded(model) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=None, architecture=architecture_for(model.config.model_type),
                       source="tiny", device=torch.device("cpu"), dtype=torch.float32,
                       fingerprint=weights_fingerprint(model))


def _windows(n=4, seqlen=24, seed=3):
    ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, DataSpec(split="calibration", seqlen=seqlen, n_windows=n))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _assert_weights_are_dequantized(qm):
    for layer, weights in zip(qm.architecture.decoder_layers(qm.model), qm.weights):
        for name, linear in qm.architecture.layer_linears(layer).items():
            assert torch.equal(linear.weight, weights[name].dequantize(linear.weight.dtype))


@pytest.mark.parametrize("spec", [RTN, GPTQ], ids=["rtn", "gptq"])
def test_copy_is_quantized_and_base_is_untouched(tiny_model, spec):
    loaded = _loaded(tiny_model)
    before = _snapshot(tiny_model)
    ids = _windows(2, 16, seed=9).input_ids
    dense_logits = _logits(tiny_model, ids)
    qm = quantize_model(loaded, [2, 4, 3], _windows(), spec=spec, use_cache=False)
    assert qm.model is not tiny_model and qm.bits == (2, 4, 3)
    after = tiny_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in tiny_model.modules())
    assert torch.equal(_logits(tiny_model, ids), dense_logits)
    _assert_weights_are_dequantized(qm)
    for layer, b in zip(qm.weights, qm.bits):
        assert all(w.bits == b and int(w.codes.max()) < 2**b for w in layer.values())
    quantized_logits = _logits(qm.model, ids)
    assert torch.isfinite(quantized_logits).all() and not torch.equal(quantized_logits, dense_logits)
    size = qm.size()
    assert size.unquantized["embedding"] > 0 and size.unquantized["norms"] > 0
    assert size.unquantized["head"] == (0 if tiny_model.config.tie_word_embeddings else 128 * 64 * 4)
    assert size.total_bytes < size.dense_bytes and 0 < size.unquantized_fraction < 1
    assert bool(qm.warnings) == (spec.method == "gptq")  # 96 tokens for 96 inputs: too few, said so


def test_cached_and_uncached_paths_give_identical_models():
    loaded = _loaded(TINY_FACTORIES["qwen2"]())
    calibration, ids = _windows(), _windows(2, 16, seed=9).input_ids
    clear_memory_cache()
    files_before = set((cache_root() / "quant").rglob("*"))
    scratch = quantize_model(loaded, [3, 2, 4], calibration, spec=GPTQ, use_cache=False)
    assert set((cache_root() / "quant").rglob("*")) == files_before  # no cache writes
    first = quantize_model(loaded, [3, 2, 4], calibration, spec=GPTQ)
    memory = quantize_model(loaded, [3, 2, 4], calibration, spec=GPTQ)
    clear_memory_cache()
    disk = quantize_model(loaded, [3, 2, 4], calibration, spec=GPTQ)
    assert (first.stats.computed, memory.stats.memory_hits, disk.stats.disk_hits) == (3, 3, 3)
    reference = _logits(scratch.model, ids)
    for qm in (first, memory, disk):
        assert torch.equal(_logits(qm.model, ids), reference)
        for a, b in zip(qm.weights, scratch.weights):
            assert all(torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scales, b[n].scales) for n in a)
    # another calibration set is another cache entry
    other = quantize_model(loaded, [3, 2, 4], _windows(seed=4), spec=GPTQ)
    assert other.stats.computed == 3


def test_sequential_gptq_reuses_the_layers_whose_prefix_is_unchanged():
    loaded = _loaded(TINY_FACTORIES["llama"]())
    calibration, ids = _windows(), _windows(2, 16, seed=9).input_ids
    clear_memory_cache()
    first = quantize_model(loaded, [3, 4, 4], calibration, spec=GPTQ)
    runs = [first]
    for bits, hits in (([3, 4, 2], 2), ([2, 4, 2], 0)):
        qm = quantize_model(loaded, bits, calibration, spec=GPTQ)
        assert (qm.stats.memory_hits, qm.stats.computed) == (hits, 3 - hits)
        scratch = quantize_model(loaded, bits, calibration, spec=GPTQ, use_cache=False)
        assert torch.equal(_logits(qm.model, ids), _logits(scratch.model, ids))  # cached = from scratch
        runs.append(qm)
    # layer 1 at 4 bits depends on layer 0's bits
    assert not torch.equal(runs[1].weights[1]["o"].codes, runs[2].weights[1]["o"].codes)


def test_dense_signal_gptq_results_are_per_layer_and_prepared_once():
    loaded = _loaded(TINY_FACTORIES["qwen2"]())
    calibration = _windows()
    clear_memory_cache()
    prepared = prepare_levels(loaded, DENSE_GPTQ, [2, 4], calibration)
    assert prepared.computed == 6
    qm = quantize_model(loaded, [4, 2, 4], calibration, spec=DENSE_GPTQ)
    assert (qm.stats.memory_hits, qm.stats.computed) == (3, 0)
    fresh = quantize_model(loaded, [4, 2, 4], calibration, spec=DENSE_GPTQ, use_cache=False)
    ids = _windows(2, 16, seed=9).input_ids
    assert torch.equal(_logits(qm.model, ids), _logits(fresh.model, ids))
    with pytest.raises(QuantizationError, match="earlier layers"):
        layer_weights(loaded, GPTQ, {0: [4]}, calibration)
    sequential = prepare_levels(loaded, GPTQ, [2, 4], calibration)  # the uniform allocations of each level
    assert sequential.computed == 6
    assert quantize_model(loaded, [2, 2, 2], calibration, spec=GPTQ).stats.memory_hits == 3


def test_damaged_cache_file_is_a_miss():
    loaded = _loaded(TINY_FACTORIES["llama"]())
    spec = QuantizerSpec(bits=3, group_size=16)
    clear_memory_cache()
    quantize_model(loaded, [3, 3, 3], spec=spec)
    target = next(f for f in (cache_root() / "quant").rglob("layer_001.safetensors")
                  if json.loads(__import__("safetensors").safe_open(str(f), "pt").metadata()["info"])
                  ["spec"] == spec.to_dict())
    raw = bytearray(target.read_bytes())
    raw[-3] ^= 0xFF
    target.write_bytes(bytes(raw))
    clear_memory_cache()
    again = quantize_model(loaded, [3, 3, 3], spec=spec)
    assert again.stats.computed >= 1 and again.stats.disk_hits >= 2
    reference = quantize_model(loaded, [3, 3, 3], spec=spec, use_cache=False)
    ids = _windows(1, 8).input_ids
    assert torch.equal(_logits(again.model, ids), _logits(reference.model, ids))


def test_new_allocation_is_served_from_the_prepared_levels():
    loaded = _loaded(TINY_FACTORIES["mistral"]())
    quantize_model(loaded, [2, 2, 2], spec=RTN)
    prepare_levels(loaded, RTN, [2, 4])
    order = layer_order(3, "importance", [0.3, 0.1, 0.2])
    alloc = allocate_fraction(order, 4, 2, 1 / 3)
    again = quantize_model(loaded, alloc, spec=RTN)
    assert again.bits == (4, 2, 4)
    assert again.stats.memory_hits == 3 and again.stats.computed == 0
    fresh = quantize_model(loaded, alloc, spec=RTN, use_cache=False)
    ids = _windows(1, 8).input_ids
    assert torch.equal(_logits(again.model, ids), _logits(fresh.model, ids))


def test_bad_requests_are_refused():
    loaded = _loaded(TINY_FACTORIES["llama"]())
    with pytest.raises(QuantizationError, match="one bit level per layer"):
        quantize_model(loaded, [4, 4], spec=RTN)
    with pytest.raises(QuantizationError, match="from 2 to 8"):
        quantize_model(loaded, [4, 16, 4], spec=RTN)
    with pytest.raises(QuantizationError, match="calibration"):
        quantize_model(loaded, [4, 4, 4], spec=QuantizerSpec(method="gptq"))


def test_progress_reaches_the_total():
    calls = []
    loaded = _loaded(TINY_FACTORIES["llama"]())
    quantize_model(loaded, [4, 3, 4], _windows(), spec=GPTQ, use_cache=False,
                   progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] and [c[0] for c in calls] == sorted(c[0] for c in calls)


FLOAT_RTN = QuantizerSpec(method="rtn", group_size=16, zero_point="float")
SYMMETRIC_GPTQ = QuantizerSpec(method="gptq", group_size=16, zero_point="symmetric")


@pytest.mark.parametrize("name, spec", [("llama-tied", RTN), ("phi3", GPTQ), ("qwen2", FLOAT_RTN),
                                        ("llama", SYMMETRIC_GPTQ)])
def test_save_and_load_give_identical_logits(tmp_path, name, spec):
    loaded = _loaded(TINY_FACTORIES[name]())
    qm = quantize_model(loaded, [2, 3, 4], _windows(), spec=spec, use_cache=False)
    folder = save_quantized(qm, tmp_path / "saved")
    assert sorted(p.suffix for p in folder.iterdir()) == [".json", ".json", ".safetensors"]
    back = load_quantized(folder)
    ids = _windows(2, 16, seed=9).input_ids
    assert torch.equal(_logits(back.model, ids), _logits(qm.model, ids))
    assert back.bits == qm.bits and back.spec == spec and back.fingerprint == loaded.fingerprint
    _assert_weights_are_dequantized(back)
    info = json.loads((folder / "quantization.json").read_text())
    first = next(iter(info["linears"].values()))
    assert first["bits"] == 2 and info["size"]["bits_per_weight"] > 2
    # codes are packed: the file is far smaller than fp32 weights
    assert (folder / "model.safetensors").stat().st_size < 0.6 * sum(
        p.numel() * 4 for p in loaded.model.parameters())
    with pytest.raises(FolderExistsError, match="already exists"):
        save_quantized(qm, folder)
    assert save_quantized(qm, folder, overwrite=True) == folder


def test_size_report_on_the_builtin_shapes(builtin):
    arch = builtin.architecture
    report = size_report(builtin.model, arch, [4] * builtin.num_layers, QuantizerSpec(bits=4, group_size=128))
    hidden, inter = 576, 1536
    per_layer_weights = 2 * hidden * hidden + 2 * hidden * 192 + 3 * hidden * inter
    per_layer_bits = (4 + 5 * 32 / 576) * (per_layer_weights - hidden * inter) + 4.25 * hidden * inter
    assert report.quantized_weights == 30 * per_layer_weights
    assert report.bits_per_weight == pytest.approx(per_layer_bits / per_layer_weights)
    assert report.unquantized["embedding"] == 49152 * 576 * 4 and report.unquantized["head"] == 0
    assert report.unquantized["norms"] == (2 * 30 + 1) * 576 * 4
    assert report.dense_bytes == sum(p.numel() * 4 for p in builtin.model.parameters())
    assert any("tied" in note for note in report.notes)


def test_builtin_q4_1_weights_are_reproduced_exactly_by_float_zero_points(builtin):
    """The built-in was shipped as GGUF Q4_1: 4 bits, group 32, fp16 scale + min reproduce it bit for bit."""
    arch, spec = builtin.architecture, QuantizerSpec(bits=4, group_size=32, zero_point="float")
    for index in (0, 15, 29):
        for linear in arch.layer_linears(arch.decoder_layers(builtin.model)[index]).values():
            assert torch.equal(rtn_quantize(linear.weight, spec).dequantize(), linear.weight)


@pytest.mark.slow
def test_builtin_8bit_is_near_lossless(builtin):
    windows = token_windows(DataSpec(split="evaluation", seqlen=128, n_windows=4), builtin.tokenizer)
    dense = perplexity(builtin.model, windows).ppl
    qm = quantize_model(builtin, [8] * builtin.num_layers, spec=QuantizerSpec(bits=8), use_cache=False)
    quantized = perplexity(qm.model, windows).ppl
    assert abs(quantized / dense - 1) < 0.01
    assert qm.size().bits_per_weight < 8.3
