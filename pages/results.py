"""Results page: every stored run, trade-off curves, exports."""

import pandas as pd
import streamlit as st

from engine.report import ReportSection, build_report
from engine.tradeoff import SIZE_AXES, quality_axes, tradeoff_figure, with_labels
from ui.session import current_model, results_store

store = results_store()
st.title("Results")
runs = store.runs_frame()
if runs.empty:
    st.info("No stored runs yet. Measure a baseline on the Model page, or run a compression.")
    st.stop()

runs = with_labels(runs)
cols = st.columns(3)
models = cols[0].multiselect("Models", sorted(runs["model"].unique()), default=sorted(runs["model"].unique()))
methods = cols[1].multiselect("Methods", sorted(runs["method"].unique()), default=sorted(runs["method"].unique()))
data_choices = sorted(runs["data_label"].unique())
chosen_data = cols[2].selectbox("Evaluation data (charts never mix windows)", data_choices, key="results_data")
shown = runs[runs["model"].isin(models) & runs["method"].isin(methods)]
st.dataframe(shown, hide_index=True)
st.download_button("Download runs.csv", shown.to_csv(index=False).encode(), "runs.csv", "text/csv")

st.subheader("Trade-off curves")
on_data = shown[shown["data_label"] == chosen_data]
size_axes = {k: v for k, v in SIZE_AXES.items() if k in on_data and on_data[k].notna().any()}
quality = quality_axes(on_data)
if not size_axes or not quality:
    st.info("No runs with both a size and a quality metric on this data yet.")
    st.stop()
cols = st.columns(2)
x = cols[0].selectbox("Size axis", list(size_axes), format_func=size_axes.get, key="results_x")
y = cols[1].selectbox("Quality axis", list(quality), format_func=quality.get, key="results_y")
subtitle = f"models {', '.join(models)}; evaluated on {chosen_data}"
figure = tradeoff_figure(on_data, x, y, subtitle)
st.plotly_chart(figure, key="results_tradeoff")
st.caption(f"Computed on: {subtitle}. Circled points are Pareto-optimal; the dotted line is the dense baseline.")

if "config.saved_to" in shown and shown["config.saved_to"].notna().any():
    st.subheader("Saved compressed models")
    st.dataframe(shown[shown["config.saved_to"].notna()][["id", "method", "series", "config.saved_to"]],
                 hide_index=True)

st.subheader("Report")
loaded = current_model()
cards = {loaded.source: loaded.card} if loaded is not None and loaded.source in models else {}
table = on_data[["id", "method", "series", x, y]].rename(columns=lambda c: c.removeprefix("metrics."))
st.download_button(  # built only when clicked: inlining plotly.js is too heavy for every rerun
    "Download HTML report",
    lambda: build_report("LayerLab report", cards, [ReportSection(f"{y} vs {size_axes[x]}", figure, subtitle, table)],
                         shown).encode(),
    "layerlab-report.html", "text/html",
)
st.caption(f"{len(shown)} runs; generated {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC; opens offline.")
