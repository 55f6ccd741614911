"""Discovery on made-up module trees, and clear refusals for layouts LayerLab cannot use."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, BartConfig, LlamaConfig, T5Config

from engine.core.architectures import UnsupportedArchitectureError, architecture_for, architecture_of
from engine.core.discovery import discover_architecture
from engine.core.models import LoadedModel, NotCausalLMError, load_model
from tests.tiny_families import tiny_family_model


class _Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.wv(x))


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_a = nn.LayerNorm(d)
        self.attention = _Attention(d)
        self.ln_b = nn.LayerNorm(d)
        self.ffn = nn.Sequential()
        self.ffn.up = nn.Linear(d, 4 * d)
        self.ffn.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.ln_a(x))
        return x + self.ffn(self.ln_b(x))


class MadeUpLM(nn.Module):
    """A causal LM with its own names everywhere and no Hugging Face config."""

    def __init__(self, d: int = 32, vocab: int = 50, n: int = 3) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))
        self.ln_out = nn.LayerNorm(d)
        self.unembed = nn.Linear(d, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_out(x))


def test_made_up_tree_is_discovered():
    arch = architecture_of(MadeUpLM())
    assert arch.source == "discovered" and arch.model_type == "MadeUpLM"
    assert (arch.layers, arch.embedding, arch.final_norm, arch.head) == ("blocks", "tok", "ln_out", "unembed")
    assert (arch.attention, arch.mlp, arch.attn_norm, arch.mlp_norm) == ("attention", "ffn", "ln_a", "ln_b")
    assert arch.attn_inputs == ("attention.wq", "attention.wk", "attention.wv")
    assert arch.attn_output == "attention.wo" and arch.mlp_inputs == ("ffn.up",) and arch.mlp_output == "ffn.proj"
    assert arch.norm_kind == "layer" and "verified exact only for" in arch.reason("slicing")
    assert arch.reason("sublayer") is None and arch.reason("quantization") is None


def test_made_up_tree_without_blocks_is_refused_clearly():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Linear(8, 10))
    with pytest.raises(UnsupportedArchitectureError,
                       match="no decoder-layer stack.*top-level modules: 0 \\(Embedding\\)"):
        architecture_of(model)
    with pytest.raises(UnsupportedArchitectureError, match="no decoder-layer stack"):
        LoadedModel.from_model(model)


def test_blocks_without_a_head_are_refused_clearly():
    model = MadeUpLM()
    del model.unembed
    with pytest.raises(UnsupportedArchitectureError, match="no language-model head"):
        architecture_of(model)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "phi3"])
def test_discovery_agrees_with_the_table(family):
    model = tiny_family_model(family)
    table, found = architecture_for(family), discover_architecture(model)
    for field in ("layers", "embedding", "head", "final_norm", "attn_inputs", "attn_output", "mlp_inputs",
                  "mlp_output", "attn_norm", "mlp_norm", "attention", "mlp", "norm_kind"):
        assert getattr(found, field) == getattr(table, field), field
    assert sorted(found.linears.values()) == sorted(table.linears.values())


def test_encoder_decoder_model_is_refused_naming_what_it_is():
    from transformers import T5ForConditionalGeneration

    with torch.device("meta"):
        t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder.*t5.*decoder-only"):
        architecture_of(t5)


@pytest.mark.parametrize("config", [
    T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64),
    BartConfig(d_model=32, encoder_layers=1, decoder_layers=1, vocab_size=64),
], ids=["t5", "bart"])
def test_encoder_decoder_folder_is_refused(tmp_path, config):
    config.save_pretrained(tmp_path)
    with pytest.raises(NotCausalLMError, match="encoder-decoder model.*encoder stack and a decoder stack"):
        load_model(str(tmp_path))


def test_nested_vision_language_folder_names_its_text_part(tmp_path):
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64).to_dict()
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    AutoConfig.for_model("llava", text_config=text, vision_config=vision).save_pretrained(tmp_path)
    with pytest.raises(NotCausalLMError, match="multimodal model.*text part \\(model_type 'llama'\\)"):
        load_model(str(tmp_path))


def test_nested_vision_language_tree_lists_the_stacks_it_found():
    from transformers import LlavaForConditionalGeneration

    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       vocab_size=64).to_dict()
    vision = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 1, "num_attention_heads": 2, "image_size": 32, "patch_size": 16}
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(AutoConfig.for_model("llava", text_config=text, vision_config=vision))
    with pytest.raises(UnsupportedArchitectureError, match="vision / audio tower.*language_model.layers"):
        architecture_of(model)
