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

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers share the two cores: one torch thread each
    torch.set_num_threads(1)


def pytest_configure(config):
    """Empty the browser screenshots folder once per run (in the main process, not in each xdist worker)."""
    if not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(Path(__file__).resolve().parent.parent / "test-artifacts" / "browser", ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` with the browser test files as one unit: they run one after another on one worker
    while the other worker runs everything else.  Two Streamlit servers and two browsers at once on two cores
    slowed the user journey from ~2.5 to ~7 minutes.  Other ``--dist`` modes are left alone."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class BrowserFilesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "tests/browser" if scope.startswith("tests/browser/") else scope

    return BrowserFilesTogether(config, log)


@pytest.fixture(params=sorted(TINY_FACTORIES))
def tiny_model(request):
    """A tiny random causal LM of each supported architecture (fp32, eval mode)."""
    torch.manual_seed(0)
    return TINY_FACTORIES[request.param]()


@pytest.fixture(scope="session")
def builtin():
    """The built-in SmolLM2-135M, loaded once per test session."""
    from engine.core.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def store(tmp_path):
    from engine.runs.store import ResultsStore

    return ResultsStore(tmp_path / "results.sqlite")


@pytest.fixture(autouse=True)
def _apptest_in_navigation_mode(monkeypatch):
    """Run AppTests the way a real server runs after its first run: in ``st.navigation`` mode.

    AppTest resets ``PagesManager.uses_pages_directory`` before *every* run, so
    with a ``pages/`` folder each run after the first would execute the page
    file alone (legacy mode), skipping ``app.py``'s router, sidebar and
    settings.  A real server flips the flag once (``ui.navigation``) and keeps it.
    """
    from streamlit.runtime.pages_manager import PagesManager

    original = PagesManager.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", init)


@pytest.fixture(scope="session")
def tiny_folder():
    """A saved tiny Llama with the built-in tokenizer (see ``tiny_model_folder``), made once per session."""
    from tests.tiny_models import tiny_model_folder

    return tiny_model_folder(_SESSION_CACHE / "tiny-llama")


@pytest.fixture
def tiny_app(tiny_folder, monkeypatch):
    """AppTests in this test start with the tiny model instead of the built-in one."""
    monkeypatch.setenv("LAYERLAB_DEFAULT_MODEL", tiny_folder)
    return tiny_folder


@pytest.fixture
def tiny_loaded(tiny_folder):
    """The tiny model loaded through the normal path."""
    from engine.core.models import load_model

    return load_model(tiny_folder)
