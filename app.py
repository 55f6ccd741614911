"""LayerLab: router and the shared sidebar (model choice)."""

import streamlit as st

from ui.sidebar import model_sidebar

st.set_page_config(page_title="LayerLab", layout="wide")

PAGES = [
    st.Page("pages/model.py", title="Model", default=True),
    st.Page("pages/redundancy.py", title="Layer redundancy"),
    st.Page("pages/slicing.py", title="Slicing"),
    st.Page("pages/quantization.py", title="Quantization"),
    st.Page("pages/results.py", title="Results"),
]

model_sidebar()
st.navigation(PAGES).run()
