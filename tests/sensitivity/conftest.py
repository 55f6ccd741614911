"""Fixtures of the sensitivity tests: a tiny Llama and token windows for it."""

from __future__ import annotations

import pytest
import torch

from engine.core.architectures import architecture_for
from tests.tiny_models import TINY_FACTORIES


@pytest.fixture
def llama():
    """(model, architecture) of the tiny random Llama (3 layers, hidden 64, vocabulary 128)."""
    model = TINY_FACTORIES["llama"]()
    return model, architecture_for("llama")


@pytest.fixture
def ids() -> torch.Tensor:
    """6 windows × 32 random tokens of the tiny models' vocabulary (192 tokens: a full-rank PCA of width 64)."""
    return torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def loaded(tiny_folder):
    """The tiny saved Llama (4 layers, the built-in tokenizer) loaded once per module: tokenizing is the slow part."""
    from engine.core.models import load_model

    return load_model(tiny_folder)


@pytest.fixture
def text_file(tmp_path):
    """A small UTF-8 text file (a few thousand tokens): quick to tokenize for CLI runs."""
    from engine.core.data import wiki_offline_split

    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(text for _title, text in wiki_offline_split("calibration")[:3]), encoding="utf-8")
    return str(path)
