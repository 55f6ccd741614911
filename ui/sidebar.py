"""The shared sidebar: choose and load a model."""

from __future__ import annotations

import streamlit as st

from engine.core.models import BUILTIN_NAME
from ui.session import current_model, default_source, request_model


def model_sidebar() -> None:
    """Pick a model id/path, device and dtype; show what is loaded."""
    with st.sidebar:
        st.header("Model")
        with st.form("model_form"):
            source = st.text_input(
                "Hugging Face id or local path", value=default_source(),
                help=f"'{BUILTIN_NAME}' is the built-in offline model.",
            )
            device = st.selectbox("Device", ["auto", "cpu", "cuda", "mps"])
            dtype = st.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"])
            trust = st.checkbox(
                "Trust remote code", value=False,
                help="Runs Python code from the model's repository. Only for sources you trust.",
            )
            submitted = st.form_submit_button("Load model")
        if trust:
            st.warning("Remote code will run with your permissions when this model loads.")
        if submitted:
            request_model(source, device, dtype, trust)
        loaded = current_model()
        if loaded is not None:
            st.caption(
                f"Loaded **{loaded.source}** ({loaded.card['architecture']}, "
                f"{loaded.num_layers} layers) on {loaded.device}, {loaded.card['dtype']}."
            )
