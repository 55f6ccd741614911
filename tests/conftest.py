"""Shared fixtures: an isolated cache per test session, tiny random models, the built-in model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

_SESSION_CACHE = Path(tempfile.mkdtemp(prefix="layerlab-test-cache-"))
_PROJECT_MODELS = Path(__file__).resolve().parent.parent / "cache" / "models"
_PROJECT_MODELS.mkdir(parents=True, exist_ok=True)
(_SESSION_CACHE / "models").symlink_to(_PROJECT_MODELS)  # convert the built-in model once, ever
os.environ["LAYERLAB_CACHE"] = str(_SESSION_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from tests.tiny_models import TINY_FACTORIES  # noqa: E402


@pytest.fixture(params=sorted(TINY_FACTORIES))
def tiny_model(request):
    """A tiny random causal LM of each supported architecture (fp32, eval mode)."""
    torch.manual_seed(0)
    return TINY_FACTORIES[request.param]()


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M, loaded once per test session."""
    from engine.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def store(tmp_path):
    from engine.store import ResultsStore

    return ResultsStore(tmp_path / "results.sqlite")
