"""The one Streamlit internal LayerLab relies on (``ui/navigation.py``): fails when an upgrade changes it."""

from __future__ import annotations

import inspect

import streamlit.commands.navigation as navigation
from streamlit.runtime.pages_manager import PagesManager
from streamlit.runtime.scriptrunner import script_runner


def test_the_legacy_pages_flag_still_exists_and_still_means_what_we_flip():
    assert hasattr(PagesManager, "uses_pages_directory")
    # st.navigation itself leaves legacy mode by clearing the same flag (what we do one run earlier) ...
    assert "PagesManager.uses_pages_directory = False" in inspect.getsource(navigation.navigation)
    # ... and the script runner still takes the legacy path only while the flag is set
    assert "if PagesManager.uses_pages_directory:" in inspect.getsource(script_runner)


def test_first_run_leaves_legacy_mode_and_runs_the_router(tiny_app, monkeypatch):
    """(AppTest resets the flag before every run, so only the first run is real here; the browser tests
    check that a real server's first session keeps its first sidebar input.)"""
    from streamlit.testing.v1 import AppTest

    from tests.apptest import APP

    monkeypatch.undo()  # drop the autouse test shim: this test checks the real first-run path
    monkeypatch.setenv("LAYERLAB_DEFAULT_MODEL", tiny_app)
    at = AppTest.from_file(APP, default_timeout=120).run()
    assert not at.exception
    assert PagesManager.uses_pages_directory is False
    assert at.title[0].value == "LayerLab" and at.sidebar.text_input[0].value == tiny_app  # the Start page


def test_every_page_enters_through_the_router_before_drawing_anything():
    """A page opened by its own URL on a new server runs alone (legacy mode: no sidebar, file names as links)
    unless its first statement after the imports sends it through app.py (the browser tests open /results on a
    fresh server and check the sidebar)."""
    import ast
    from pathlib import Path

    pages = sorted((Path(__file__).resolve().parents[2] / "pages").glob("*.py"))
    assert len(pages) == 9
    for page in pages:
        body = [n for n in ast.parse(page.read_text()).body
                if not isinstance(n, (ast.Import, ast.ImportFrom))
                and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]  # docstring
        first = body[0]
        assert isinstance(first, ast.Expr) and ast.unparse(first.value) == "enter_through_the_router()", page.name
