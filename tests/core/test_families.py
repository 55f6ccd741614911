"""Every family through the normal path: load, LR / ZD scores, quantization, dropping (tiny random models)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.core.architectures import UnsupportedArchitectureError
from engine.core.data import DataSpec, TokenWindows
from engine.core.models import load_model
from engine.dropping.choose import DropError
from engine.dropping.drop_model import drop_model
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model
from engine.scores.outliers import weight_outliers
from engine.scores.redundancy import layer_redundancy
from tests.tiny_families import CONFIGS, MOE_FAMILIES, tiny_family_model

TABLE = {"llama", "mistral", "qwen2", "phi3", "opt"}
RTN = QuantizerSpec(method="rtn", group_size=32)


def _windows(n: int = 4, seqlen: int = 16, seed: int = 3) -> TokenWindows:
    ids = torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, DataSpec(split="calibration", seqlen=seqlen, n_windows=n))


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from engine.core.builtins import builtin_model_dir

    return AutoTokenizer.from_pretrained(builtin_model_dir())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def family(request, tmp_path_factory, tokenizer):
    """(family name, the tiny model, the same model loaded from a folder through ``load_model``)."""
    model = tiny_family_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return request.param, model, load_model(str(folder), device="cpu", dtype="float32")


def test_loads_through_the_normal_path(family):
    name, model, loaded = family
    ids = _windows(2).input_ids
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids))
    arch = loaded.architecture
    assert arch.source == ("table" if name in TABLE else "discovered")
    assert loaded.card["layout"].startswith(arch.source)
    assert loaded.num_layers == 3
    for key, reason in arch.unavailable.items():
        assert reason and any(key in label or reason == value for label, value in loaded.card.items())


def test_lr_and_zd_scores(family):
    name, _, loaded = family
    arch = loaded.architecture
    lr = layer_redundancy(loaded.model, arch, _windows())
    assert len(lr.lr) == 3 and all(math.isfinite(v) and -1 <= v <= 1 for v in lr.lr)
    if arch.reason("sublayer"):
        assert all(math.isnan(v) for v in lr.attn_cos)  # gemma2: post-block norms
    else:
        assert all(math.isfinite(v) for v in lr.attn_cos + lr.mlp_cos)
    zd = weight_outliers(loaded.model, arch)
    assert zd.modules == arch.linear_names and len(zd.zd_layer) == 3
    assert all(0 < v < 1 for v in zd.zd_layer)


def test_rtn_quantizes_every_linear_experts_included(family):
    name, model, loaded = family
    qm = quantize_model(loaded, [3, 8, 8], spec=RTN, use_cache=False)
    layer = qm.architecture.decoder_layers(qm.model)[0]
    dense = loaded.architecture.layer_linears(loaded.architecture.decoder_layers(loaded.model)[0])
    for short, linear in qm.architecture.layer_linears(layer).items():
        assert torch.equal(linear.weight, qm.weights[0][short].dequantize(linear.weight.dtype))
        assert not torch.equal(linear.weight, dense[short].weight), short
    if name in MOE_FAMILIES:
        assert any(short.startswith("expert") for short in qm.weights[0])
        size = qm.size()
        assert size.unquantized["other"] < size.dense_bytes * 0.05  # fused expert tensors are counted as quantized
    assert torch.isfinite(_logits(qm.model, _windows(1).input_ids)).all()


def test_one_dropped_layer_and_blocks(family):
    name, model, loaded = family
    ids = _windows(1).input_ids
    dropped = drop_model(loaded, "layer", [1])
    assert len(dropped.architecture.decoder_layers(dropped.model)) == 2
    assert dropped.model.config.num_hidden_layers == 2
    assert torch.isfinite(_logits(dropped.model, ids)).all()
    reason = loaded.architecture.reason("drop-mlp")
    if reason:  # OPT: the MLP is no submodule
        with pytest.raises(DropError, match="cannot drop"):
            drop_model(loaded, "mlp", [1])
    else:
        assert torch.isfinite(_logits(drop_model(loaded, "mlp", [1]).model, ids)).all()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids))  # the base is untouched


@pytest.mark.parametrize("name", ["qwen3", pytest.param("gemma", marks=pytest.mark.slow),
                                  pytest.param("opt", marks=pytest.mark.slow),
                                  pytest.param("phi", marks=pytest.mark.slow)])
def test_gptq_on_discovered_and_layernorm_families(name):
    from engine.core.models import LoadedModel

    loaded = LoadedModel.from_model(tiny_family_model(name))
    qm = quantize_model(loaded, [4, 4, 4], _windows(8, 24), spec=QuantizerSpec(method="gptq", group_size=32),
                        use_cache=False)
    assert torch.isfinite(_logits(qm.model, _windows(1).input_ids)).all()


@pytest.mark.parametrize("name", MOE_FAMILIES)
def test_gptq_on_fused_experts_is_refused_with_the_reason(name):
    from engine.core.models import LoadedModel

    loaded = LoadedModel.from_model(tiny_family_model(name))
    assert "RTN" in loaded.architecture.reason("gptq")
    with pytest.raises(UnsupportedArchitectureError, match="fused 3-D tensors"):
        quantize_model(loaded, [4, 4, 4], _windows(), spec=QuantizerSpec(method="gptq", group_size=32),
                       use_cache=False)
