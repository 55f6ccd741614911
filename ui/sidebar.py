"""The shared sidebar: choose and load a model, and the runtime it will be deployed with."""

from __future__ import annotations

import streamlit as st

from engine.core.builtins import BUILTINS
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES, Runtime
from ui.session import current_model, default_source, request_model
from ui.state import kept

TYPED = "(the id or path above)"


def model_sidebar() -> None:
    """Pick a model id/path, device and dtype; show what is loaded."""
    with st.sidebar:
        st.header("Model")
        with st.form("model_form"):
            source = st.text_input(
                "Hugging Face id or local path", value=default_source(),
                help=f"Built-in offline models: {', '.join(BUILTINS)} (type the name, or pick it below).",
            )
            builtin = st.selectbox("…or a built-in model", [TYPED, *BUILTINS],
                                   help="Offline models shipped on PyPI (both were quantized before LayerLab got "
                                   "them: see the Model page).")
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
            request_model(source if builtin == TYPED else builtin, device, dtype, trust)
        loaded = current_model()
        if loaded is not None:
            st.caption(
                f"Loaded **{loaded.source}** ({loaded.card['architecture']}, "
                f"{loaded.num_layers} layers) on {loaded.device}, {loaded.card['dtype']}."
            )
        runtime = st.selectbox("Deploy with (target runtime)", list(RUNTIMES), key=kept("runtime"),
                               format_func=lambda key: RUNTIMES[key].label,
                               help="Where the compressed model will run. Quantization settings, bit levels and "
                               "the optimizer offer only what that runtime runs as it is; every run records it. "
                               "The research grid allows everything, for exploring.")
        st.caption(RUNTIMES[runtime].summary())


def target_runtime() -> Runtime:
    """The runtime chosen in the sidebar (the research grid until one is chosen)."""
    return RUNTIMES[st.session_state.get(kept("runtime")) or DEFAULT_RUNTIME]
