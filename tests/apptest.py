"""Starting the dashboard under ``streamlit.testing``: with the tiny model (fast tier) or the built-in one."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app.py")


def open_app(page: str | None = "model", timeout: float = 300) -> AppTest:
    """Run the app (the default model loads), optionally switch to ``pages/<page>.py``.

    The default model is the built-in one, or the tiny one when the test uses the ``tiny_app`` fixture.
    """
    at = AppTest.from_file(APP, default_timeout=timeout)
    at.run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception, at.exception
    return at


def use_small_data(at: AppTest, windows: int = 2, seqlen: int = 32) -> AppTest:
    """Set calibration and evaluation data (shared by every page) to ``windows`` × ``seqlen`` and rerun."""
    for key, value in (("keep.calib_windows", windows), ("keep.calib_seqlen", seqlen),
                       ("keep.eval_windows", windows), ("keep.eval_seqlen", seqlen)):
        at.number_input(key=key).set_value(value)
    return at.run()


def click(at: AppTest, label_start: str) -> AppTest:
    """Click the first button whose label starts with ``label_start`` and rerun."""
    return next(b for b in at.button if b.label.startswith(label_start)).click().run()


def plotly_values(array) -> list:
    """A trace's data as a list: Plotly JSON stores numeric arrays as base64 typed arrays (``{"dtype", "bdata"}``)."""
    if isinstance(array, dict) and "bdata" in array:
        return np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"]).tolist()
    return list(array)
