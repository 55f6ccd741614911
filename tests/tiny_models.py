"""Tiny random models built from configs, one per supported architecture (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
)

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def _build(config) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random norm scales, so norm fusion is really exercised
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
    return model.eval()


TINY_FACTORIES = {
    "llama": lambda: _build(LlamaConfig(**COMMON)),
    "llama-tied": lambda: _build(LlamaConfig(**{**COMMON, "tie_word_embeddings": True})),
    "mistral": lambda: _build(MistralConfig(**COMMON, sliding_window=None)),
    "qwen2": lambda: _build(Qwen2Config(**COMMON)),
    "phi3": lambda: _build(Phi3Config(**{**COMMON, "num_key_value_heads": 4}, pad_token_id=0)),
}


def tiny_model_folder(folder) -> str:
    """A tiny random Llama (4 layers, hidden 64) saved with the built-in model's real tokenizer.

    It loads through the normal ``load_model(path)`` path, and tokenizes the
    same text as the built-in model, so pages and runs work end to end in a
    fraction of the time.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    from engine.core.builtins import builtin_model_dir

    folder = Path(folder)
    if (folder / "config.json").exists():
        return str(folder)
    tokenizer = AutoTokenizer.from_pretrained(builtin_model_dir())
    config = LlamaConfig(**{**COMMON, "vocab_size": len(tokenizer), "num_hidden_layers": 4,
                            "max_position_embeddings": 2048, "tie_word_embeddings": True})
    model = _build(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)
