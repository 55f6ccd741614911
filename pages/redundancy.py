"""Layer redundancy page: LR cosine and ZD outlier scores as interactive charts."""

import streamlit as st

from engine.core.data import BOS_LABEL, DataError
from engine.core.out_of_memory import RunOutOfMemory
from engine.runs.cached_scores import compute_scores, lr_scores_cached, scores_if_cached
from engine.runs.first_run import CALIBRATION
from engine.runs.runner import scoring_estimate
from engine.scores.findings import redundancy_findings
from engine.viz import charts
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.state import kept
from ui.widgets import (
    cancel_button,
    computed_on,
    data_spec_controls,
    progress_callback,
    show_chart,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py

loaded = require_model()
store = results_store()

st.title("Layer redundancy")
st.caption(
    "LR = mean cosine between a decoder layer's input and output hidden states (taken with hooks, "
    "fp32, padding masked): near 1 means the layer barely changes the residual stream. "
    "LIM = −LR. ZD = fraction of a layer's linear weights with z > 1; outliers use |z| > k."
)
spec = data_spec_controls("calibration", loaded)
k = st.number_input("Outlier threshold k (|z| > k)", 1.0, 20.0, 3.0, 0.5, key=kept("scores_k"))
if spec is None:
    st.stop()

try:
    found = scores_if_cached(store, loaded, spec, k)
    estimate = scoring_estimate(loaded, spec)
except DataError as err:
    st.error(str(err))
    st.stop()
if found is None:
    left, right = st.columns([1, 3])
    if left.button(f"Compute scores ({estimate})", type="primary", key="compute_scores"):
        with right:
            cancel_button("scores")
        try:
            lr, zd, _hit = compute_scores(store, loaded, spec, k, progress=progress_callback("Scores"))
        except (DataError, RunOutOfMemory) as err:
            st.error(str(err))
            st.stop()
    else:
        guided = ""
        if spec != CALIBRATION and lr_scores_cached(store, loaded, CALIBRATION):
            guided = (f" The guided run's scores ({CALIBRATION.n_windows} windows × {CALIBRATION.seqlen} tokens) "
                      "are cached: choose those windows above to see them.")
        st.info("Scores for these windows are not computed yet. Press **Compute scores** "
                "(one forward pass; cached per model, data, windows and seqlen)." + guided)
        st.stop()
else:
    lr, zd = found
    st.caption("Scores loaded from the cache (same model, data, windows and seqlen).")

on_data = computed_on(loaded, lr.data_label)
on_weights = computed_on(loaded, "weights only")
st.subheader("What this says")
st.markdown("\n".join(f"- {line}" for line in redundancy_findings(lr, zd)) + f"\n- {lr.n_tokens:,} tokens scored"
            + (" (the BOS that starts each window is attended to, not scored)."
               if lr.data_label.endswith(BOS_LABEL) else "."))

left, right = st.columns(2)
with left:
    robust = st.toggle("Robust colour scale", value=True, key=kept("scores_robust"),
                       help="The colours start at the 10th percentile, so one outlying layer does not wash out the "
                       "rest; hover for exact values.")
    show_chart(charts.lr_position_heatmap(lr, lr.data_label, robust), "lr_by_position", on_data,
               charts.position_table(lr))
with right:
    show_chart(charts.outlier_heatmap(zd, "weights only"), "weight_outliers", on_weights, charts.outlier_table(zd))
left, right = st.columns(2)
with left:
    zoom = st.toggle("Zoom to the bulk of the layers", value=True, key=kept("scores_zoom"),
                     help="The axis leaves out outlying layers (layer 0 often rewrites its input); the chart names "
                     "them with their values.")
    show_chart(charts.lr_profile_chart(lr, lr.data_label, zoom), "lr_per_layer", on_data, charts.lr_table(lr))
with right:
    show_chart(charts.zd_chart(zd, "weights only"), "zd_per_layer", on_weights, charts.outlier_table(zd))
left, right = st.columns(2)
with left:
    show_chart(charts.rank_scatter(lr, zd, lr.data_label), "lim_vs_zd_ranks", on_data, charts.rank_table(lr, zd))
with right:
    layer = st.selectbox("Layer", range(len(lr.lr)), format_func=lambda i: f"layer {i} (LR {lr.lr[i]:.3f})",
                         key="scores_layer")
    show_chart(charts.token_cosine_histogram(lr, layer, lr.data_label), f"token_cosines_layer_{layer}", on_data,
               charts.histogram_table(lr, layer))
