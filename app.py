"""LayerLab: router and the shared sidebar (model choice)."""

import streamlit as st
from streamlit.runtime.pages_manager import PagesManager

from ui.sidebar import model_sidebar

st.set_page_config(page_title="LayerLab", layout="wide")

# Because a pages/ folder exists, Streamlit runs the very first script run of a server in its
# legacy multipage mode; widget ids of that run differ from later st.navigation runs, so the
# first session's first sidebar input would be lost. Switch to st.navigation mode and rerun.
if PagesManager.uses_pages_directory:
    PagesManager.uses_pages_directory = False
    st.rerun()

PAGES = [
    st.Page("pages/model.py", title="Model", default=True),
    st.Page("pages/redundancy.py", title="Layer redundancy"),
    st.Page("pages/slicing.py", title="Slicing"),
    st.Page("pages/quantization.py", title="Quantization"),
    st.Page("pages/results.py", title="Results"),
]

model_sidebar()
st.navigation(PAGES).run()
