"""Model page: the model card and baseline perplexity."""

import streamlit as st

from engine.data import DataError, token_windows
from engine.evaluate import perplexity
from engine.models import dense_size_metrics
from engine.store import Timer
from ui.session import require_model, results_store
from ui.widgets import computed_on, data_spec_controls, progress_callback

loaded = require_model()
store = results_store()

st.title("Model")
if loaded.note:
    st.info(loaded.note)
st.table({"property": list(loaded.card), "value": [str(v) for v in loaded.card.values()]})

st.subheader("Baseline perplexity")
st.caption(
    "Token perplexity in the GPTQ/SliceGPT convention: non-overlapping windows, no stride, "
    "95% interval by bootstrap over windows. Evaluation text never overlaps calibration text."
)
spec = data_spec_controls("baseline", "evaluation", loaded)
if spec is not None and st.button("Measure baseline perplexity", type="primary"):
    try:
        windows = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
        with Timer() as timer:
            result = perplexity(loaded.model, windows, progress=progress_callback("Evaluating"))
    except DataError as err:
        st.error(str(err))
    else:
        store.add_run(
            model=loaded.source, model_fingerprint=loaded.fingerprint, method="dense",
            config={}, data={**spec.to_dict(), "n_windows": windows.n_windows},
            metrics={**result.to_metrics(), **dense_size_metrics(loaded.model)}, duration_s=timer.seconds,
        )
        st.metric("Perplexity", f"{result.ppl:.3f}", help=f"95% interval {result.ci_low:.2f}–{result.ci_high:.2f}")
        st.caption(computed_on(loaded, windows.label()) + f" Took {timer.seconds:.1f} s.")

st.subheader("Earlier results for this model")
history = store.runs_frame(model=loaded.source)
if history.empty:
    st.caption("No stored results yet.")
else:
    st.dataframe(history, hide_index=True)
