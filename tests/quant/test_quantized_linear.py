"""Quantized variants hold codes and share the base model's other tensors (issue #18)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine.quant.grid import QuantizedWeight, QuantizerSpec, rtn_quantize
from engine.quant.packing import pack_rows, packed_row_bytes, slot_bits, unpack_rows
from engine.quant.quantize_model import apply_weights, quantize_model
from engine.quant.quantized_linear import QuantizedLinear, held_code_bytes
from tests.quant.test_quantize_model import GPTQ, _loaded, _logits, _snapshot, _windows

SPECS = {"rtn-g32": QuantizerSpec(method="rtn", group_size=32),
         "rtn-float-g16": QuantizerSpec(method="rtn", group_size=16, zero_point="float"),
         "gptq-act-order": GPTQ}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_variant_logits_equal_a_materialised_copy_and_base_is_untouched(tiny_model, name):
    spec = SPECS[name]
    loaded = _loaded(tiny_model)
    before = _snapshot(tiny_model)
    bits = [4 if i % 2 else 3 for i in range(loaded.num_layers)]
    windows = _windows() if spec.method == "gptq" else None
    qm = quantize_model(loaded, bits, windows, spec=spec, use_cache=False)
    layers = loaded.architecture.decoder_layers(qm.model)
    held = [m for m in qm.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(held) == sum(len(loaded.architecture.layer_linears(layer)) for layer in layers)
    materialised = copy.deepcopy(tiny_model)
    apply_weights(materialised, loaded.architecture, qm.weights)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(qm.model, ids), _logits(materialised, ids), rtol=0, atol=0)
    assert qm.model.state_dict().keys() == tiny_model.state_dict().keys()
    for key, value in _snapshot(tiny_model).items():  # the base is never written, not even its copy's view
        assert torch.equal(value, before[key]), key


def test_variant_shares_every_tensor_it_does_not_quantize(tiny_model):
    loaded = _loaded(tiny_model)
    qm = quantize_model(loaded, [4] * loaded.num_layers, spec=QuantizerSpec(method="rtn", group_size=32),
                        use_cache=False)
    base = {t.data_ptr() for t in tiny_model.parameters()}
    own = [name for name, p in qm.model.named_parameters() if p.data_ptr() not in base]
    assert own == []  # embeddings, norms, biases, head: the base's tensors
    linear_bytes = sum(linear.weight.numel() * 4 for layer in loaded.architecture.decoder_layers(tiny_model)
                       for linear in loaded.architecture.layer_linears(layer).values())
    scale_bytes = sum(linear.weight.shape[0] * -(-linear.weight.shape[1] // 32) * 4
                      for layer in loaded.architecture.decoder_layers(tiny_model)
                      for linear in loaded.architecture.layer_linears(layer).values())
    assert held_code_bytes(qm.model) == linear_bytes / 8 + scale_bytes  # two 4-bit codes a byte, fp16 scale+zero
    assert qm.size().dense_bytes == sum(p.numel() * 4 for p in tiny_model.parameters())


def test_model_to_dtype_keeps_scales_exact():
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    stored = rtn_quantize(linear.weight.detach(), QuantizerSpec(method="rtn", bits=3, group_size=32))
    layer = QuantizedLinear(stored, None, torch.float32, torch.device("cpu"))
    layer.to(torch.bfloat16)  # would round fp16 scales if they were float buffers
    assert torch.equal(layer.stored().scales, stored.scales) and torch.equal(layer.stored().zeros, stored.zeros)
    assert torch.equal(layer.weight, stored.dequantize())


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("in_features", [1, 7, 64, 77])
def test_packed_codes_round_trip_at_every_width(bits, in_features):
    codes = torch.randint(0, 2**bits, (5, in_features), generator=torch.Generator().manual_seed(bits),
                          dtype=torch.uint8)
    packed = pack_rows(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(in_features, bits))
    assert packed.shape[1] == -(-in_features * slot_bits(bits) // 8)  # 2-bit: four a byte, 3/4-bit: two, else one
    assert torch.equal(unpack_rows(packed, bits, in_features), codes)


def test_a_quantized_weight_holds_packed_codes_and_moves_without_unpacking():
    torch.manual_seed(0)
    weight = torch.randn(16, 70)
    stored = rtn_quantize(weight, QuantizerSpec(method="rtn", bits=3, group_size=32))
    assert stored.packed.shape == (16, 35) and stored.shape == (16, 70)
    assert stored.nbytes_in_memory() == 16 * 35 + 16 * 3 * 4
    moved = stored.to("cpu")
    assert moved is stored
    rebuilt = QuantizedWeight(scales=stored.scales, zeros=stored.zeros, bits=3, group_size=32,
                              packed=stored.packed, in_features=70)
    assert torch.equal(rebuilt.dequantize(), stored.dequantize())
    assert (stored.dequantize() - weight).abs().max() <= stored.scales.float().max() / 2 + 1e-6
    with pytest.raises(ValueError, match="either codes or packed"):
        QuantizedWeight(scales=stored.scales, zeros=stored.zeros, bits=3, group_size=32)
