"""Streamlit helpers shared by the pages: model session, store, common widgets."""
