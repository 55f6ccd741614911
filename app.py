"""LayerLab: router and the shared sidebar (model choice)."""

import streamlit as st

from ui.navigation import enter_through_the_router
from ui.sidebar import model_sidebar
from ui.state import restore_widget_state, save_widget_state

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
try:
    page.run()
finally:  # pages stop early with st.stop(); settings are saved either way
    save_widget_state()
