"""Starting the dashboard under ``streamlit.testing``."""

from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_app(page: str | None = None, timeout: float = 300) -> AppTest:
    """Run the app (built-in model loads), optionally switch to ``pages/<page>.py``."""
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, at.exception
    return at
