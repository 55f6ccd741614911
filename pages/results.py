"""Results page: every stored run, trade-off curves, the report builder and exports."""

import pandas as pd
import streamlit as st

from engine.runs.summary import compact_table, executive_summary
from engine.viz.report import ReportItem, build_report
from engine.viz.tradeoff import (
    data_labels_by_use,
    filter_runs,
    quality_axes,
    size_axes,
    tradeoff_figure,
)
from ui.export_panel import export_section
from ui.navigation import enter_through_the_router
from ui.report_pins import PINS, pinned
from ui.session import current_model, results_store
from ui.state import kept
from ui.widgets import cost_threshold, show_chart, show_runs_table

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py

store = results_store()
st.title("Results")
stopped = store.interrupted()
if not stopped.empty:
    with st.expander(f"Interrupted computations ({len(stopped)}): stopped before they finished, not stored as runs"):
        st.dataframe(stopped.rename(columns={"created_at": "noticed (UTC)", "completed": "got as far as"}),
                     hide_index=True)
        if st.button("Forget interrupted computations", key="forget_interrupted",
                     help="Removes this list only; stored runs are untouched."):
            store.clear_interrupted()
            st.rerun()
runs = store.runs_frame()
if runs.empty:
    st.info("No stored runs yet. Measure a baseline on the Model page, or run a compression.")
    st.stop()

cols = st.columns(3)
all_models = sorted(runs["model"].unique())
loaded = current_model()
latest = str(runs.sort_values("id")["model"].iloc[-1])
opened_on = loaded.source if loaded is not None and loaded.source in all_models else latest
model = cols[0].selectbox("Model", all_models, index=all_models.index(opened_on), key=f"results_model_{opened_on}",
                          help="One model at a time: its dense baseline is the reference of every number on this "
                          "page and in the report. Opens on the loaded model (else the latest run's), and follows "
                          "the sidebar when another model is loaded.")
all_methods = sorted(runs.loc[runs["model"] == model, "method"].unique())
methods = cols[1].multiselect("Methods", all_methods, default=all_methods)
shown = filter_runs(runs, [model], methods)
data_choices = data_labels_by_use(shown) if not shown.empty else []
if not data_choices:
    st.info("No runs match these filters.")
    st.stop()
chosen_data = cols[2].selectbox("Evaluation data (charts never mix windows)", data_choices, key="results_data",
                                help="Listed by how many compressed runs each holds; runs on different windows or "
                                "different files are never drawn together.")
on_data = filter_runs(shown, data_label=chosen_data)  # the table and the charts: one set of windows
show_runs_table(compact_table(on_data))
if len(on_data) < len(shown):
    st.caption(f"Runs on {chosen_data} ({len(on_data)} of {len(shown)}): every run, on every set of windows, "
               "is in 'Every column' and runs.csv.")
with st.expander(f"Every column ({shown.shape[1]}), every run"):
    st.dataframe(shown, hide_index=True)
st.download_button("Download runs.csv", shown.to_csv(index=False).encode(), "runs.csv", "text/csv")
with st.expander("Export a run's model (GGUF file, compressed-tensors or Hugging Face folder)"):
    if current_model() is None:
        st.caption("Load the run's model in the sidebar to export its runs.")
    else:
        export_section(store, current_model(), None, "results")

st.subheader("Trade-off curves")
x_axes, quality = size_axes(on_data[on_data["method"] != "dense"]), quality_axes(on_data)
if not x_axes or not quality:
    st.info("No compressed runs with both a size and a quality metric on this data yet.")
    st.stop()
cols = st.columns(3)
x = cols[0].selectbox("Size axis", list(x_axes), format_func=x_axes.get, key=kept("results_x"))
y = cols[1].selectbox("Quality axis", list(quality), format_func=quality.get, key=kept("results_y"))
scale = cols[2].radio("Quality scale", ["auto", "linear", "log"], horizontal=True, key=kept("results_scale"),
                      help="auto: log only when the values span a decade.")
subtitle = f"model {model}; evaluated on {chosen_data}"
figure = tradeoff_figure(on_data, x, y, subtitle, log_y=None if scale == "auto" else scale == "log")
show_chart(figure, "results_tradeoff",
           f"Computed on: {subtitle}. Dense (black star, dotted line) on the same windows; previews hollow and "
           "dashed; grey band: Pareto frontier; bars: 95% intervals.",
           on_data[["id", "method", "series", "preview", x, y]])

if "config.saved_to" in shown and shown["config.saved_to"].notna().any():
    st.subheader("Saved compressed models")
    st.dataframe(shown[shown["config.saved_to"].notna()][["id", "method", "series", "config.saved_to"]],
                 hide_index=True)

st.subheader("Report")
summary = executive_summary(on_data, chosen_data, threshold=cost_threshold())
cards = {}
if loaded is not None and loaded.source == model:
    cards = {loaded.source: {**loaded.card, **({"weights as loaded": loaded.note} if loaded.note else {})}}
    if loaded.note:  # a built-in model came quantized: every number in the report is damage on top of that
        summary.append(f"About {loaded.source}: {loaded.note}")
st.markdown("\n".join(f"- {line}" for line in summary))
items = pinned()
st.caption(f"{len(items)} pinned chart(s): pin any chart with its **Add to report** button on any page. "
           "The trade-off chart above is included when nothing is pinned.")
for number, item in enumerate(items):
    left, up, right = st.columns([5, 1, 1])
    left.markdown(f"{number + 1}. **{item.title}**" + (f" — {item.note}" if item.note else "")
                  + f"  \n<small>{item.computed_on.removeprefix('Computed on: ')}</small>", unsafe_allow_html=True)
    if number and up.button("Move up", key=f"pin_up_{number}"):
        items[number - 1], items[number] = items[number], items[number - 1]
        st.session_state[PINS] = items
        st.rerun()
    if right.button("Remove", key=f"unpin_{number}"):
        st.session_state[PINS] = [i for i in items if i is not item]
        st.rerun()
report_items = items or [ReportItem(figure.layout.title.text.split("<br>")[0], figure, subtitle,
                                    on_data[["id", "method", "series", x, y]])]
st.download_button(  # built only when clicked: inlining plotly.js is too heavy for every rerun
    "Download HTML report",
    lambda: build_report(f"LayerLab report: {model} ({pd.Timestamp.now(tz='UTC'):%Y-%m-%d})", cards,
                         report_items, shown, summary,
                         compact_table(on_data)).encode(),
    "layerlab-report.html", "text/html",
)
st.caption(f"{len(shown)} runs; generated {pd.Timestamp.now(tz='UTC'):%Y-%m-%d %H:%M} UTC; opens offline; "
           "each chart's camera button saves a PNG.")
