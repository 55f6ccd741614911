"""Settings kept across pages.

A widget's id includes the page it is on, so the same key on another page is
a new widget that would start from its default.  Widgets whose key starts
with ``keep.`` are re-assigned through ``st.session_state`` at the start of
every run (Streamlit's documented way to carry a value into a new widget) and
saved under ``_saved.<name>`` at the end, so calibration / evaluation choices
and method settings survive page changes, also through pages that lack them.
"""

from __future__ import annotations

import streamlit as st

KEEP = "keep."
SAVED = "_saved."


def restore_widget_state() -> None:
    """Call at the start of every run, before any page creates widgets."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(SAVED):
            widget = KEEP + key.removeprefix(SAVED)
            st.session_state[widget] = st.session_state.get(widget, st.session_state[key])
        elif isinstance(key, str) and key.startswith(KEEP):
            st.session_state[key] = st.session_state[key]


def save_widget_state() -> None:
    """Call at the end of every run (also when a page stops early): remember every kept widget's value."""
    for key in list(st.session_state.keys()):
        if isinstance(key, str) and key.startswith(KEEP):
            st.session_state[SAVED + key.removeprefix(KEEP)] = st.session_state[key]


def kept(name: str) -> str:
    """The widget key of a setting that survives page changes."""
    return f"{KEEP}{name}"


def keep_setting(name: str, value) -> None:
    """Set a kept setting from code (e.g. a button's callback): every page's widget ``kept(name)`` shows
    ``value`` from the next run on."""
    st.session_state[KEEP + name] = value
    st.session_state[SAVED + name] = value


def kept_value(name: str):
    """A kept setting's value (``None`` until a page has shown its widget or code set it)."""
    return st.session_state.get(KEEP + name, st.session_state.get(SAVED + name))
