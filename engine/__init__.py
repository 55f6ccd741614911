"""LayerLab's computation: models, data, scores, compression, evaluation, results.

Nothing in this package imports streamlit; the dashboard and the CLI call it.
"""
