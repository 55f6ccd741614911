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


def use_small_data(at: AppTest, prefix: str) -> AppTest:
    """Set a page's calibration and evaluation data to 2 windows × 32 tokens and rerun."""
    for key, value in ((f"{prefix}_calib_windows", 2), (f"{prefix}_calib_seqlen", 32),
                       (f"{prefix}_eval_windows", 2), (f"{prefix}_eval_seqlen", 32)):
        at.number_input(key=key).set_value(value)
    return at.run()
