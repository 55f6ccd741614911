"""Model page: the model card and baseline perplexity."""

import streamlit as st

from engine.data import DataError
from engine.experiments import EvalPlan, run_dense
from engine.models import weights_fingerprint
from engine.zeroshot import TaskUnavailableError
from ui.session import require_model, results_store
from ui.widgets import computed_on, data_spec_controls, progress_callback, show_accuracies, zero_shot_controls

loaded = require_model()
store = results_store()

st.title("Model")
if loaded.note:
    st.info(loaded.note)
st.table({"property": list(loaded.card), "value": [str(v) for v in loaded.card.values()]})

if st.button("Verify weights", help="Recompute the weight fingerprint and compare it with the one taken at load."):
    if weights_fingerprint(loaded.model) == loaded.fingerprint:
        st.success(f"Weights unchanged since load (fingerprint {loaded.fingerprint}).")
    else:
        st.error("The loaded weights changed since load. Reload the model from the sidebar.")

st.subheader("Baseline perplexity")
st.caption(
    "Token perplexity in the GPTQ/SliceGPT convention: non-overlapping windows, no stride, "
    "95% interval by bootstrap over windows. Evaluation text never overlaps calibration text."
)
spec = data_spec_controls("baseline", "evaluation", loaded)
zero_shot = zero_shot_controls("baseline")
if spec is not None and st.button("Measure baseline perplexity", type="primary"):
    try:
        outcome = run_dense(store, loaded, EvalPlan(spec, **zero_shot), progress=progress_callback("Baseline"))
    except (DataError, TaskUnavailableError) as err:
        st.error(str(err))
    else:
        m = outcome.metrics
        st.metric("Perplexity", f"{m['ppl']:.3f}", help=f"95% interval {m['ci_low']:.2f}–{m['ci_high']:.2f}")
        show_accuracies(m)
        st.caption(computed_on(loaded, outcome.data["label"]) + f" Stored as run {outcome.run_id}.")

st.subheader("Earlier results for this model")
history = store.runs_frame(model=loaded.source)
if history.empty:
    st.caption("No stored results yet.")
else:
    st.dataframe(history, hide_index=True)
