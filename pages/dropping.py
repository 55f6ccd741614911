"""Dropping page: remove whole layers, or only attention or MLP blocks, ranked by redundancy scores."""

import streamlit as st

from engine.runs.plans import DropPlan, EvalPlan
from engine.runs.runner import (
    default_save_folder,
    dropped_layers,
    run_dropping,
    run_estimate,
    scores_if_cached,
)
from engine.viz import charts
from ui.session import require_model, results_store
from ui.state import kept
from ui.widgets import (
    calibration_and_evaluation,
    preview_or_stop,
    method_tradeoff,
    progress_callback,
    run_controls,
    show_chart,
)

BLOCKS = {"layer": "whole layers (ShortGPT)", "attention": "attention blocks only (LLM-Drop)",
          "mlp": "MLP blocks only (LLM-Drop)"}
RANKINGS = {"lr": "LR (= lowest Block Influence)", "attention": "attention-block cosine",
            "mlp": "MLP-block cosine", "custom": "custom list"}

loaded = require_model()
store = results_store()
n_layers = loaded.num_layers

st.title("Dropping")
st.caption(
    "Remove the most redundant decoder layers (ShortGPT: highest LR = lowest Block Influence), or only their "
    "attention or MLP blocks (LLM-Drop: highest block cosine). The dropped model is a real smaller model: the "
    "modules are removed, so parameters, bytes and latency are honest. Layers are chosen at once from the dense "
    "model's scores on the calibration text."
)
calibration, evaluation, zero_shot = calibration_and_evaluation(loaded)
cols = st.columns(4)
block = cols[0].radio("Drop", list(BLOCKS), format_func=BLOCKS.get, key=kept("drop_block"))
count = cols[1].slider("How many", 0, n_layers - 1, min(4, n_layers - 2), key=kept("drop_count"))
by = cols[2].selectbox("Ranked by", list(RANKINGS), format_func=RANKINGS.get, key=kept("drop_by"))
protect = cols[3].checkbox("Protect first and last layer", value=True, key=kept("drop_protect"),
                           help="Layer 0 rewrites the embedding and the last layer prepares the head.")
custom = ()
if by == "custom":
    custom = tuple(st.multiselect("Layers to drop", list(range(n_layers)), key="drop_custom"))
plan = DropPlan(block, count, by, protect, custom)
if calibration is None or evaluation is None:
    st.stop()

st.subheader("Preview")
layers = preview_or_stop(lambda: dropped_layers(store, loaded, plan, calibration, compute=False),
                         store, loaded, calibration, "Ranking the layers")
found = scores_if_cached(store, loaded, calibration)
if found is not None:
    lr, _zd = found
    table = charts.drop_preview_table(lr, by, layers)
    show_chart(charts.drop_preview_chart(table, f"{loaded.source}; scores from {calibration.label()}"),
               "drop_preview", f"{len(layers)} {BLOCKS[block]} go: layers {layers or 'none'}. "
               f"Scores from {calibration.label()} on {loaded.source}.", table)
else:
    st.caption(f"Dropping layers {layers or 'none'}.")

plan_eval = EvalPlan(evaluation, **zero_shot)
run_controls(loaded, "dropping", run_estimate(loaded, "dropping", calibration, plan_eval, store),
             "Save the dropped model under cache/dropped/",
             lambda save: run_dropping(store, loaded, plan, calibration, plan_eval, layers=layers,
                                       save_to=default_save_folder(loaded, "dropping", plan) if save else None,
                                       progress=progress_callback("Dropping")))

st.subheader("Trade-off")
method_tradeoff(store, loaded, "dropping", evaluation, "dropping_tradeoff")
