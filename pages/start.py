"""Start page: what LayerLab is for, the path through the pages, and a guided first run."""

from pathlib import Path

import streamlit as st

from engine.core.data import DataError
from engine.evaluation.latency import describe_seconds
from engine.runs.first_run import CALIBRATION, EVALUATION, first_run_seconds, first_run_steps, skipped_note
from engine.runs.plans import DEFAULT_EVAL_SEQLEN, DEFAULT_EVAL_WINDOWS
from engine.viz.tradeoff import filter_runs, tradeoff_figure
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.widgets import cancel_button, progress_callback, show_chart, use_data, uses_data

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py


GLOSSARY = Path(__file__).resolve().parents[1] / "docs" / "glossary.md"

st.title("LayerLab")
st.markdown(
    "LayerLab shows which layers of a language model matter least, lets you compress it (slice its width, "
    "quantize its weights, drop layers) and measures what each choice costs against the uncompressed model "
    "on the same text. Every result is kept, compared at matched sizes, and exported for the runtime you "
    "deploy with.")
st.subheader("The path")
cols = st.columns(5)
for col, (path, title, what) in zip(cols, (
        ("pages/model.py", "1 · Model", "load a model and measure its baseline perplexity"),
        ("pages/redundancy.py", "2 · Redundancy", "which layers change their input least"),
        ("pages/quantization.py", "3 · A method", "quantization, slicing or dropping (sidebar)"),
        ("pages/results.py", "4 · Results", "every run against dense, at matched sizes"),
        ("pages/results.py", "5 · Report", "pin charts, download one HTML file"))):
    col.page_link(path, label=title)
    col.caption(what)
with st.expander("Terms used here (glossary)"):
    st.markdown(GLOSSARY.read_text().split("\n", 3)[-1])  # the list, without its title and link line

loaded = require_model()
store = results_store()
st.subheader("Guided first run")
steps = first_run_steps(store, loaded)
st.markdown(f"On **{loaded.source}**, with {EVALUATION.data.n_windows} windows of {EVALUATION.data.seqlen} tokens "
            "(small, so it is quick; the pages let you measure on more):")
for number, step in enumerate(steps, start=1):
    st.markdown(f"{number}. **{step.title}**: {step.what}")
if (note := skipped_note(loaded)) is not None:
    st.caption(f"Left out for this model: {note}")
left, right = st.columns(2)
if left.button(f"Start the guided run ({describe_seconds(first_run_seconds(steps))})", type="primary", key="guided",
               help="Each run is stored like any other: the Results page and the trade-off charts show them."):
    with right:
        cancel_button("first_run")
    findings = []
    try:
        for step in steps:
            with st.status(f"{step.title} ({describe_seconds(step.seconds)})…", expanded=True) as box:
                finding = step.run(progress_callback(step.title))
                st.write(finding)
                box.update(label=f"{step.title}: done", state="complete", expanded=False)
            findings.append((step.title, finding))
    except (DataError, ValueError) as err:
        st.error(str(err))
    st.session_state["first_run_findings"] = findings

findings = st.session_state.get("first_run_findings")
if findings:
    st.subheader("What it found")
    for title, finding in findings:
        st.markdown(f"**{title}.** {finding}")
    runs = filter_runs(store.runs_frame(model=loaded.source), fingerprint=loaded.fingerprint)
    label = next((r.data_label for r in store.runs(model=loaded.source, method="dense")
                  if r.data.get("seqlen") == EVALUATION.data.seqlen
                  and r.data.get("n_windows") == EVALUATION.data.n_windows), None)
    shown = filter_runs(runs, data_label=label) if label else runs.iloc[0:0]
    if not shown.empty and (shown["method"] != "dense").any():
        subtitle = f"{loaded.source}; perplexity on {label}"
        show_chart(tradeoff_figure(shown, "metrics.size_fraction", "metrics.ppl", subtitle), "first_run_tradeoff",
                   f"Computed on: {subtitle}. Dense is the black star; lower and further left is better.",
                   shown[["id", "method", "series", "metrics.size_fraction", "metrics.ppl"]])
    methods = [f"**{step.title}**" for step in steps if step.key not in ("baseline", "scores")]
    pages = " or ".join(filter(None, (", ".join(methods[:-1]), methods[-1]))) if methods else "a method page"
    st.markdown(f"Next: open {pages} to try other settings, **Compare methods** to put them side by side at "
                "matched sizes, and **Results** for the table and the report.")
    guided = f"{EVALUATION.data.n_windows} windows × {EVALUATION.data.seqlen} tokens"
    if uses_data(CALIBRATION, EVALUATION.data):
        st.caption(f"Every page now measures on the guided run's {guided} (change it under each page's "
                   "'Calibration and evaluation data').")
    else:
        left, right = st.columns([2, 3])
        left.button(f"Use {guided} on every page", key="use_guided_windows", on_click=use_data,
                    args=(CALIBRATION, EVALUATION.data),
                    help="Sets the shared calibration and evaluation data (each page's 'Calibration and evaluation "
                    "data') to the guided run's, so its runs and scores show there; change it back there.")
        right.caption(f"The guided run measured on {guided} of calibration and evaluation text; the other pages "
                      f"start on {DEFAULT_EVAL_WINDOWS} windows × {DEFAULT_EVAL_SEQLEN} tokens of evaluation text, "
                      "and runs are compared only on the same windows, so its runs and scores show there once you "
                      "choose its windows (the button, or each page's data settings). Results lists every set of "
                      "windows under 'Evaluation data'.")
