"""A level per linear: the entries, the quantized copy, its size, caches, saving and the GGUF type plan."""

from __future__ import annotations

import pytest
import torch

from engine.optimize.bit_budget import layer_costs
from engine.quant.grid import QuantizationError
from engine.quant.layer_bits import describe_all, linear_bits, normalize
from engine.quant.quantize_model import clear_memory_cache, quantize_model
from engine.quant.save import load_quantized, save_quantized
from engine.quant.size import size_report
from tests.quant.test_quantize_model import GPTQ, RTN, _assert_weights_are_dequantized, _loaded, _logits, _windows
from tests.tiny_models import TINY_FACTORIES

LINEARS = ["q", "k", "v", "o", "gate", "up", "down"]


def _mixed(**levels) -> dict[str, int]:
    return {name: levels.get(name, 4) for name in LINEARS}


def test_entries_are_validated_and_a_uniform_layer_is_one_level():
    assert normalize(_mixed()) == 4
    assert normalize(_mixed(v=6), LINEARS) == {**_mixed(), "v": 6}
    assert linear_bits(_mixed(down=3), "down") == 3 and linear_bits(5, "down") == 5
    with pytest.raises(QuantizationError, match="every linear of the layer"):
        normalize({"q": 4, "k": 3}, LINEARS)
    with pytest.raises(QuantizationError, match="'v'.*from 2 to 8"):
        normalize(_mixed(v=9), LINEARS)
    assert describe_all([4, _mixed(v=6)]) == "4 [q4 k4 v6 o4 gate4 up4 down4]"


def test_rtn_per_linear_copy_takes_each_linear_from_its_own_level():
    loaded = _loaded(TINY_FACTORIES["llama"]())
    mixed = [_mixed(v=2, down=8), 3, _mixed(gate=2)]
    qm = quantize_model(loaded, mixed, spec=RTN, use_cache=False)
    assert qm.bits == (_mixed(v=2, down=8), 3, _mixed(gate=2))
    _assert_weights_are_dequantized(qm)
    uniform = {b: quantize_model(loaded, [b] * 3, spec=RTN, use_cache=False) for b in (2, 3, 4, 8)}
    for i, entry in enumerate(qm.bits):
        for name, weight in qm.weights[i].items():
            b = linear_bits(entry, name)
            assert weight.bits == b and torch.equal(weight.codes, uniform[b].weights[i][name].codes)
    # honest size: each linear at its own level, matching the optimizer's cost table
    size = size_report(loaded.model, loaded.architecture, qm.bits, RTN)
    costs = layer_costs(loaded.model, loaded.architecture, (2, 3, 4, 8), RTN)
    assert size.quantized_bytes * 8 == costs.total_bits(list(qm.bits))
    assert costs.total_bits([2, 3, 2]) < costs.total_bits(list(qm.bits)) < costs.total_bits([8, 3, 8])
    with pytest.raises(QuantizationError, match="every linear"):
        quantize_model(loaded, [{"q": 2}, 3, 3], spec=RTN)


def test_sequential_gptq_per_linear_caches_by_the_whole_entry():
    loaded = _loaded(TINY_FACTORIES["llama"]())
    calibration, ids = _windows(seed=12), _windows(2, 16, seed=9).input_ids
    clear_memory_cache()
    mixed = [_mixed(v=2), 4, 3]
    first = quantize_model(loaded, mixed, calibration, spec=GPTQ)
    assert first.weights[0]["v"].bits == 2 and first.weights[0]["q"].bits == 4
    scratch = quantize_model(loaded, mixed, calibration, spec=GPTQ, use_cache=False)
    assert torch.equal(_logits(first.model, ids), _logits(scratch.model, ids))
    again = quantize_model(loaded, mixed, calibration, spec=GPTQ)
    assert again.stats.memory_hits == 3
    # layer 0 at 4 bits everywhere is another entry, and layer 1 (same bits) sees another prefix
    uniform = quantize_model(loaded, [4, 4, 3], calibration, spec=GPTQ)
    assert uniform.stats.computed == 3
    assert not torch.equal(uniform.weights[0]["v"].codes, first.weights[0]["v"].codes)
    # o reads v's quantized output ("true sequential"): another v level changes o's codes
    assert not torch.equal(uniform.weights[0]["o"].codes, first.weights[0]["o"].codes)


def test_saved_per_linear_model_loads_with_its_entries(tmp_path):
    loaded = _loaded(TINY_FACTORIES["llama"]())
    qm = quantize_model(loaded, [_mixed(down=2), 3, 4], spec=RTN, use_cache=False)
    back = load_quantized(save_quantized(qm, tmp_path / "saved"))
    assert back.bits == qm.bits
    ids = _windows(2, 16, seed=9).input_ids
    assert torch.equal(_logits(back.model, ids), _logits(qm.model, ids))


def test_gguf_type_plan_follows_each_linear():
    from engine.export.gguf_file import plan_gguf_types

    loaded = _loaded(TINY_FACTORIES["llama"]())
    choices = plan_gguf_types(loaded, [_mixed(v=2, down=8), 3, 4], RTN)
    first = {c.linear: c.bits for c in choices if c.layer == 0}
    assert first == {**_mixed(v=2, down=8)} and {c.bits for c in choices if c.layer == 1} == {3}


def test_dense_signal_gptq_per_linear_reuses_each_levels_results():
    from tests.quant.test_quantize_model import DENSE_GPTQ

    loaded = _loaded(TINY_FACTORIES["qwen2"]())
    calibration = _windows(seed=11)  # windows of its own: the disk cache is shared with test_quantize_model's
    clear_memory_cache()
    low, high = (quantize_model(loaded, [b] * 3, calibration, spec=DENSE_GPTQ) for b in (2, 4))
    mixed = quantize_model(loaded, [_mixed(v=2, down=2), 4, 2], calibration, spec=DENSE_GPTQ)
    assert mixed.stats.computed == 0  # every (layer, level) was computed by the uniform runs
    for name, weight in mixed.weights[0].items():
        source = low if name in ("v", "down") else high
        assert torch.equal(weight.codes, source.weights[0][name].codes)
