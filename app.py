"""LayerLab: router and the shared sidebar (model choice)."""

import streamlit as st
from streamlit.runtime.scriptrunner_utils.exceptions import StopException

from ui.navigation import enter_through_the_router
from ui.sidebar import model_sidebar
from ui.state import restore_widget_state, save_widget_state
from ui.widgets import PAGE, computation_finished, interrupted_notice

st.set_page_config(page_title="LayerLab", layout="wide")
enter_through_the_router()
restore_widget_state()

PAGES = [
    st.Page("pages/start.py", title="Start", default=True),
    st.Page("pages/model.py", title="Model"),
    st.Page("pages/redundancy.py", title="Layer redundancy"),
    st.Page("pages/sensitivity.py", title="Sensitivity"),
    st.Page("pages/slicing.py", title="Slicing"),
    st.Page("pages/quantization.py", title="Quantization"),
    st.Page("pages/dropping.py", title="Dropping"),
    st.Page("pages/compare.py", title="Compare methods"),
    st.Page("pages/results.py", title="Results"),
]

model_sidebar()
page = st.navigation(PAGES)
interrupted_notice()  # a computation the last run left unfinished (the user navigated away mid-run)
st.session_state[PAGE] = page.title
try:
    page.run()
    computation_finished()
except (StopException, Exception):  # st.stop() ends a page early; an error is shown, not an interruption
    computation_finished()
    raise
finally:  # settings are saved either way (also when a rerun interrupts the page)
    save_widget_state()
