"""Model loading: the architecture table, local folders, and every bad source."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

from engine.core.architectures import ARCHITECTURES, UnsupportedArchitectureError, architecture_for
from engine.core.models import (
    ModelLoadError,
    NotCausalLMError,
    load_model,
    resolve_dtype,
    weights_fingerprint,
)
from tests.tiny_models import TINY_FACTORIES


def test_table_finds_every_part(tiny_model):
    arch = architecture_for(tiny_model.config.model_type)
    layers = arch.decoder_layers(tiny_model)
    assert len(layers) == tiny_model.config.num_hidden_layers
    hidden = tiny_model.config.hidden_size
    for layer in layers:
        linears = arch.layer_linears(layer)
        assert list(linears) == arch.linear_names
        for path in arch.attn_inputs + arch.mlp_inputs:
            assert layer.get_submodule(path).in_features == hidden
        assert layer.get_submodule(arch.attn_output).out_features == hidden
        assert layer.get_submodule(arch.mlp_output).out_features == hidden


def test_every_listed_architecture_has_a_tiny_test_model():
    from tests.tiny_families import CONFIGS

    tested = {factory().config.model_type for factory in TINY_FACTORIES.values()}
    assert set(ARCHITECTURES) <= tested | {spec["model_type"] for spec in CONFIGS.values()}


def test_unknown_model_type_names_the_table_and_discovery():
    with pytest.raises(UnsupportedArchitectureError, match="llama, mistral, opt, phi3, qwen2.*discovered"):
        architecture_for("gpt_neox")


def _save_with_tokenizer(model, folder, builtin):
    model.save_pretrained(folder)
    builtin.tokenizer.save_pretrained(folder)


def test_load_local_tiny_llama_folder(tmp_path, builtin):
    model = TINY_FACTORIES["llama"]()
    _save_with_tokenizer(model, tmp_path, builtin)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.card["layers"] == 3 and loaded.card["hidden size"] == 64
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)
    assert loaded.fingerprint == weights_fingerprint(model)


def test_fingerprint_changes_with_weights():
    model = TINY_FACTORIES["llama"]()
    before = weights_fingerprint(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    assert weights_fingerprint(model) != before


def test_conv1d_model_loads_with_quantization_disabled(tmp_path, builtin):
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    _save_with_tokenizer(model, tmp_path, builtin)
    loaded = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert loaded.architecture.source == "discovered" and loaded.architecture.layers == "transformer.h"
    assert "Conv1D" in loaded.architecture.reason("quantization")
    assert "Conv1D" in loaded.card["unavailable: layer-wise quantization (RTN)"]


def test_non_causal_model_is_refused(tmp_path, builtin):
    model = BertForMaskedLM(BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=64))
    _save_with_tokenizer(model, tmp_path, builtin)
    with pytest.raises(NotCausalLMError, match="not a causal"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("source, message", [
    ("", "Enter a model id"),
    ("/no/such/folder/anywhere", "Could not find a model"),
    ("nobody/no-such-model-xyz", "cannot be reached"),
])
def test_bad_sources_give_clear_errors(source, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(source)


def test_folder_without_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


def test_bad_dtype_and_device():
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            load_model("smollm2-135m", device="cuda")


def test_cache_root_is_the_project_cache_folder(monkeypatch):
    from engine.core.paths import PROJECT_ROOT, cache_root

    monkeypatch.delenv("LAYERLAB_CACHE", raising=False)
    assert (PROJECT_ROOT / "app.py").exists() and cache_root() == PROJECT_ROOT / "cache"


def test_a_model_larger_than_free_memory_is_refused_before_any_weight_is_read(tiny_folder, monkeypatch):
    """Sizes come from the config's empty (meta) model at the load dtype: 16-bit advice only for 32-bit loads."""
    from engine.core.models import ModelLoadError, load_model, skeleton_of

    loaded = load_model(tiny_folder, device="cpu")  # fits as it is
    weights = sum(p.numel() for p in loaded.model.parameters()) * 4
    monkeypatch.setattr("engine.core.memory.free_bytes", lambda device: weights // 2)
    read = []
    monkeypatch.setattr("engine.core.models.AutoModelForCausalLM.from_pretrained",
                        lambda *args, **kwargs: read.append(args))
    with pytest.raises(ModelLoadError) as refused:
        load_model(tiny_folder, device="cpu", dtype="float32")
    message = str(refused.value)
    assert f"needs ≈ {weights / 2**20:.1f} MiB for its weights in float32" in message
    assert f"only {weights // 2 / 2**20:.1f} MiB is free on cpu" in message and "bfloat16 or float16" in message
    assert not read  # refused from the config alone
    with pytest.raises(ModelLoadError) as refused_16:
        # half the bytes: still just over the free half (5% headroom)
        load_model(tiny_folder, device="cpu", dtype="bfloat16")
    assert "bfloat16 or float16" not in str(refused_16.value) and "choose a smaller model" in str(refused_16.value)
    assert skeleton_of(loaded.model.config) is not None
