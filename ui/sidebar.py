"""The shared sidebar: choose and load a model, and the runtime it will be deployed with."""

from __future__ import annotations

import streamlit as st

from engine.core.builtins import BUILTINS
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES, Runtime
from ui.session import LOAD_ERROR, current_model, default_source, request_model
from ui.state import kept

TYPED = "(the id or path above)"


def _load_from_form() -> None:
    """The form's Load button: load the typed id or the picked built-in; once it loads, the text field names it
    and the picker goes back to the field (the two never disagree); a failed load leaves the typed text to fix."""
    state = st.session_state
    source = state["model_source"] if state["model_builtin"] == TYPED else state["model_builtin"]
    request_model(source, state["model_device"], state["model_dtype"], state["model_trust"])
    if LOAD_ERROR not in state:
        state["model_source"], state["model_builtin"] = source.strip(), TYPED


def model_sidebar() -> None:
    """Pick a model id/path, device and dtype; show what is loaded."""
    with st.sidebar:
        st.header("Model")
        st.session_state.setdefault("model_source", default_source())
        with st.form("model_form"):
            st.text_input(
                "Hugging Face id or local path", key="model_source",
                help=f"Built-in offline models: {', '.join(BUILTINS)} (type the name, or pick it below).",
            )
            st.selectbox("…or a built-in model (then Load model)", [TYPED, *BUILTINS], key="model_builtin",
                         help="Offline models shipped on PyPI (both were quantized before LayerLab got them: see the "
                         "Model page). Picked here, it replaces the field above on Load.")
            st.selectbox("Device", ["auto", "cpu", "cuda", "mps"], key="model_device")
            st.selectbox("Dtype", ["auto", "float32", "bfloat16", "float16"], key="model_dtype")
            trust = st.checkbox(
                "Trust remote code", value=False, key="model_trust",
                help="Runs Python code from the model's repository. Only for sources you trust.",
            )
            st.form_submit_button("Load model", on_click=_load_from_form)
        if trust:
            st.warning("Remote code will run with your permissions when this model loads.")
        loaded = current_model()
        if LOAD_ERROR in st.session_state:  # said here, on every page, where the user typed it; the line below
            st.error(f"Not loaded: {st.session_state[LOAD_ERROR]}")  # says which model is still in use
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
