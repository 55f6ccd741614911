"""Model and store shared by every page and session.

The loaded model is cached with ``st.cache_resource``: all browser sessions
share one read-only copy, so engine code compresses copies of it.  Each
session remembers which model it chose in ``st.session_state``.
"""

from __future__ import annotations

import os

import streamlit as st

from engine.core.builtins import BUILTIN_NAME
from engine.core.models import LoadedModel, ModelLoadError, load_model
from engine.runs.store import ResultsStore

DEFAULT_MODEL_ENV = "LAYERLAB_DEFAULT_MODEL"
MODEL_KEY = "loaded_model_key"
LOAD_ERROR = "model_load_error"


@st.cache_resource(show_spinner=False, max_entries=2)
def _cached_model(source: str, device: str, dtype: str, trust_remote_code: bool) -> LoadedModel:
    return load_model(source, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


@st.cache_resource(show_spinner=False)
def results_store() -> ResultsStore:
    """The project's results store (one per server process)."""
    return ResultsStore()


def request_model(source: str, device: str, dtype: str, trust_remote_code: bool) -> None:
    """Load a model; on failure keep the previous one and remember the message."""
    key = (source.strip(), device, dtype, bool(trust_remote_code))
    try:
        _cached_model(*key)
    except ModelLoadError as err:
        st.session_state[LOAD_ERROR] = str(err)
        return
    st.session_state[MODEL_KEY] = key
    st.session_state.pop(LOAD_ERROR, None)


def default_source() -> str:
    """The model a new session starts with: ``$LAYERLAB_DEFAULT_MODEL`` if set, else the built-in one."""
    return os.environ.get(DEFAULT_MODEL_ENV) or BUILTIN_NAME


def current_model() -> LoadedModel | None:
    """The model this session loaded, loading the default one on first use."""
    if MODEL_KEY not in st.session_state and LOAD_ERROR not in st.session_state:
        request_model(default_source(), "auto", "auto", False)
    key = st.session_state.get(MODEL_KEY)
    return _cached_model(*key) if key else None


def require_model() -> LoadedModel:
    """The current model (after any load error), or stop the page with a hint."""
    loaded = current_model()
    if LOAD_ERROR in st.session_state:
        st.error(f"Model not loaded: {st.session_state[LOAD_ERROR]}")
        if loaded is not None:
            st.caption(f"Still using {loaded.source}.")
    if loaded is None:
        st.info("Load a model in the sidebar first.")
        st.stop()
    return loaded
