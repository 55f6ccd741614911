"""Layer redundancy page: LR cosine and ZD outlier scores as interactive charts."""

import streamlit as st

from engine import charts
from engine.data import DataError
from engine.experiments import compute_scores
from engine.scores import LayerRedundancy, WeightOutliers
from ui.session import require_model, results_store
from ui.widgets import chart_with_csv, computed_on, data_spec_controls, progress_callback

STATE = "redundancy_scores"

loaded = require_model()
store = results_store()

st.title("Layer redundancy")
st.caption(
    "LR = mean cosine between a decoder layer's input and output hidden states (taken with hooks, "
    "fp32, padding masked): near 1 means the layer barely changes the residual stream. "
    "LIM = −LR. ZD = fraction of a layer's linear weights with z > 1; outlier counts use |z| > k."
)
spec = data_spec_controls("scores", "calibration", loaded)
k = st.number_input("Outlier threshold k (|z| > k)", 1.0, 20.0, 3.0, 0.5, key="scores_k")

if spec is not None and st.button("Compute scores", type="primary"):
    try:
        lr, zd, lr_hit = compute_scores(store, loaded, spec, k, progress=progress_callback("Scores"))
    except DataError as err:
        st.error(str(err))
    else:
        st.session_state[STATE] = {"fingerprint": loaded.fingerprint, "lr": lr.to_dict(), "zd": zd.to_dict()}
        if lr_hit:
            st.toast("Scores loaded from the cache (same model, data, windows and seqlen).")

saved = st.session_state.get(STATE)
if not saved or saved["fingerprint"] != loaded.fingerprint:
    st.info("Choose data and press **Compute scores** (cached per model, data, windows and seqlen).")
    st.stop()

lr, zd = LayerRedundancy(**saved["lr"]), WeightOutliers(**saved["zd"])
on_data = computed_on(loaded, lr.data_label)
on_weights = computed_on(loaded, "weights only")
most = sorted(range(len(lr.lr)), key=lambda i: -lr.lr[i])[:5]
st.markdown(
    "**Most redundant layers** (highest LR): "
    + ", ".join(f"{i} ({lr.lr[i]:.3f})" for i in most)
    + f" · least redundant: layer {min(range(len(lr.lr)), key=lambda i: lr.lr[i])}"
    + f" · {lr.n_tokens:,} tokens scored"
)

left, right = st.columns(2)
with left:
    robust = st.toggle("Robust colour scale (from the 10th percentile; hover for exact values)", value=True,
                       key="scores_robust")
    chart_with_csv(charts.lr_position_heatmap(lr, lr.data_label, robust), charts.position_table(lr),
                   "lr_by_position", on_data)
with right:
    chart_with_csv(charts.outlier_heatmap(zd, "weights only"), charts.outlier_table(zd),
                   "weight_outliers", on_weights)
left, right = st.columns(2)
with left:
    chart_with_csv(charts.lr_profile_chart(lr, lr.data_label), charts.lr_table(lr), "lr_per_layer", on_data)
with right:
    chart_with_csv(charts.zd_chart(zd, "weights only"), charts.outlier_table(zd), "zd_per_layer", on_weights)
left, right = st.columns(2)
with left:
    chart_with_csv(charts.rank_scatter(lr, zd, lr.data_label), charts.rank_table(lr, zd),
                   "lim_vs_zd_ranks", on_data)
with right:
    layer = st.selectbox("Layer", range(len(lr.lr)), format_func=lambda i: f"layer {i} (LR {lr.lr[i]:.3f})",
                         key="scores_layer")
    chart_with_csv(charts.token_cosine_histogram(lr, layer, lr.data_label),
                   charts.histogram_table(lr, layer), f"token_cosines_layer_{layer}", on_data)
