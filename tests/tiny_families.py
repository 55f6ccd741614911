"""Tiny random causal LMs of every family LayerLab handles, built from configs (no downloads).

``FAMILIES`` maps a family name to a factory returning an fp32 model in eval
mode (hidden 64, 3 layers, vocabulary 128, seed 0, random norm scales and
biases so norm folding is really exercised).  ``SLICING_FAMILIES`` are the
families SliceGPT must slice exactly.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)

CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama"),
    "mistral": dict(model_type="mistral", sliding_window=None),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3", head_dim=16),
    "phi3": dict(model_type="phi3", num_key_value_heads=4, pad_token_id=0),
    "gemma": dict(model_type="gemma", head_dim=16, tie_word_embeddings=True),
    "opt": dict(model_type="opt", ffn_dim=96, word_embed_proj_dim=64, tie_word_embeddings=True,
                pad_token_id=1, enable_bias=True),
    "phi": dict(model_type="phi", num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False),
    "granite": dict(model_type="granite", embedding_multiplier=3.0, residual_multiplier=0.5,
                    logits_scaling=2.0, attention_multiplier=0.2),
    "gemma2": dict(model_type="gemma2", head_dim=16, sliding_window=16),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
    "qwen2_moe": dict(model_type="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48, decoder_sparse_step=1),
    "olmo": dict(model_type="olmo"),
    "starcoder2": dict(model_type="starcoder2", sliding_window=None),
}
SLICING_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "opt", "phi", "granite")
MOE_FAMILIES = ("mixtral", "qwen2_moe")


def tiny_config(family: str):
    """The tiny config of ``family`` (``SIZES`` overridden by its entry in ``CONFIGS``)."""
    spec = {**SIZES, **CONFIGS[family]}
    model_type = spec.pop("model_type")
    if model_type == "opt":
        spec["ffn_dim"] = spec.pop("intermediate_size")
        spec.pop("num_key_value_heads")
    return AutoConfig.for_model(model_type, **spec)


def tiny_family_model(family: str) -> torch.nn.Module:
    """A tiny random ``family`` model: seed 0, fp32, eval mode, norm scales in [0.5, 1.5] and small random biases."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                low = -0.5 if family.startswith("gemma") else 0.5  # Gemma norms compute x·(1 + w)
                param.copy_(torch.rand(param.shape, generator=generator) + low)
            elif name.endswith("bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()
