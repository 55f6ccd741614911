"""Model page: the model card and baseline perplexity."""

import streamlit as st

from engine.core.data import DataError
from engine.core.models import card_values, weights_fingerprint
from engine.core.out_of_memory import RunOutOfMemory
from engine.evaluation.latency import describe_seconds
from engine.runs.plans import EvalPlan
from engine.runs.runner import evaluation_seconds, find_dense, run_dense
from engine.runs.summary import compact_table, run_warnings
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.widgets import (
    computed_on,
    data_spec_controls,
    progress_callback,
    show_accuracies,
    show_runs_table,
    zero_shot_controls,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py

loaded = require_model()
store = results_store()

st.title("Model")
if loaded.note:
    st.info(loaded.note)
st.table({"property": list(loaded.card), "value": card_values(loaded.card)})

if st.button("Verify weights", help="Recompute the weight fingerprint and compare it with the one taken at load."):
    if weights_fingerprint(loaded.model) == loaded.fingerprint:
        st.success(f"Weights unchanged since load (fingerprint {loaded.fingerprint}).")
    else:
        st.error("The loaded weights changed since load. Reload the model from the sidebar.")

st.subheader("Baseline perplexity")
st.caption(
    "Token perplexity in the GPTQ/SliceGPT convention: non-overlapping windows, no stride, "
    "95% interval by bootstrap over windows. Evaluation text never overlaps calibration text. "
    "The same evaluation settings are used on every page, so compressed runs compare with this baseline."
)
spec = data_spec_controls("evaluation", loaded)
zero_shot = zero_shot_controls()
if spec is not None:
    plan = EvalPlan(spec, **zero_shot)
    existing = find_dense(store, loaded, plan)
    again = st.checkbox("Measure again", key="baseline_again", disabled=existing is None,
                        help="A baseline on these windows is stored already; tick to store a new measurement.")
    cost = "stored" if existing is not None and not again else describe_seconds(evaluation_seconds(loaded, spec))
    if st.button(f"Measure baseline perplexity ({cost})", type="primary", key="measure_baseline"):
        try:
            if existing is not None and not again:
                record = existing
                st.info(f"Already measured on these windows (run {record.id}); shown below, nothing stored twice.")
            else:
                record = run_dense(store, loaded, plan, progress=progress_callback("Baseline")).record
        except (DataError, RunOutOfMemory) as err:
            st.error(str(err))
        else:
            m = record.metrics
            st.metric("Perplexity", f"{m['ppl']:.3f}", help=f"95% interval {m['ci_low']:.2f}–{m['ci_high']:.2f}")
            st.caption(f"95% interval {m['ci_low']:.2f}–{m['ci_high']:.2f}.")
            show_accuracies(m)
            for warning in run_warnings(record):
                st.warning(warning)
            st.caption(computed_on(loaded, record.data_label) + f" Stored as run {record.id}.")

st.subheader("Earlier results for this model")
history = store.runs_frame(model=loaded.source)
if history.empty:
    st.caption("No stored results yet.")
else:
    show_runs_table(compact_table(history))
