"""Dropping page: remove whole layers, or only attention or MLP blocks, ranked by redundancy scores."""

import streamlit as st

from engine.methods import Dropping
from engine.runs.cached_scores import scores_if_cached
from engine.runs.drop_choice import dropped_layers, measured_drop_kl
from engine.runs.plans import DropPlan, EvalPlan
from engine.runs.runner import default_save_folder, run_dropping, run_estimate
from engine.viz import charts
from ui.export_panel import export_section
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.sidebar import target_runtime
from ui.state import kept
from ui.widgets import (
    calibration_and_evaluation,
    memory_note,
    method_tradeoff,
    preview_or_stop,
    progress_callback,
    run_controls,
    show_chart,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py
METHOD = Dropping.name  # this page's method, as its runs are stored

BLOCKS = {"layer": "whole layers (ShortGPT)", "attention": "attention blocks only (LLM-Drop)",
          "mlp": "MLP blocks only (LLM-Drop)"}
RANKINGS = {"lr": "LR (= lowest Block Influence)", "attention": "attention-block cosine",
            "mlp": "MLP-block cosine", "sensitivity": "measured sensitivity (KL of dropping it alone)",
            "custom": "custom list"}

loaded = require_model()
store = results_store()
n_layers = loaded.num_layers

st.title("Dropping")
st.caption(
    "Remove the most redundant decoder layers (ShortGPT: highest LR = lowest Block Influence), or only their "
    "attention or MLP blocks (LLM-Drop: highest block cosine). The dropped model is a real smaller model: the "
    "modules are removed, so parameters, bytes and latency are honest. Layers are ranked on the calibration "
    "text: by a score, or by the measured damage of dropping each one alone (the Sensitivity lab's KL); at once "
    "from the dense model, or iteratively (drop the top one, rank the rest again on the smaller model, repeat)."
)

calibration, evaluation, zero_shot = calibration_and_evaluation(loaded)
cols = st.columns(4)
block = cols[0].radio("Drop", list(BLOCKS), format_func=BLOCKS.get, key=kept("drop_block"))
count = cols[1].slider("How many", 0, n_layers - 1, min(4, n_layers - 2), key=kept("drop_count"))
by = cols[2].selectbox("Ranked by", list(RANKINGS), format_func=RANKINGS.get, key=kept("drop_by"))
protect = cols[3].checkbox("Protect first and last layer", value=True, key=kept("drop_protect"),
                           help="Layer 0 rewrites the embedding and the last layer prepares the head.")
custom = ()
iterative = False
if by == "custom":
    custom = tuple(st.multiselect("Layers to drop", list(range(n_layers)), key="drop_custom"))
else:
    iterative = st.toggle("Iterative: re-rank after each drop", key=kept("drop_iterative"),
                          help="Drops one block, ranks the remaining ones again on the model without it, and "
                          "repeats: 'how many' rankings instead of one. Catches layers that only look redundant "
                          "while their neighbours are there.")
plan = DropPlan(block, count, by, protect, custom, iterative)
if (runs_in := Dropping().deployment(plan, target_runtime())) is not None:
    st.info(runs_in)
if calibration is None or evaluation is None:
    st.stop()

st.subheader("Preview")
layers = preview_or_stop(lambda: dropped_layers(store, loaded, plan, calibration, compute=False),
                         store, loaded, calibration, "Ranking the layers")
if by == "sensitivity":
    kl = measured_drop_kl(store, loaded, plan, calibration)
    table = charts.drop_preview_table(None, by, layers, kl=kl) if kl is not None else None
else:
    found = scores_if_cached(store, loaded, calibration)
    table = charts.drop_preview_table(found[0], by, layers) if found is not None else None
if table is not None:
    show_chart(charts.drop_preview_chart(table, f"{loaded.source}; ranked on {calibration.label()}"),
               "drop_preview", f"{len(layers)} {BLOCKS[block]} go: layers {layers or 'none'}, chosen "
               f"{plan.choice()}. The bars are the dense model's values"
               + (" (an iterative choice can differ from their top)" if plan.is_iterative else "")
               + f"; computed on {calibration.label()} with {loaded.source}.", table)
else:
    st.caption(f"Dropping layers {layers or 'none'}, chosen {plan.choice()}.")

plan_eval = EvalPlan(evaluation, **zero_shot)
memory_note(loaded, plan, calibration, plan_eval, layers)
run_controls(loaded, METHOD, run_estimate(loaded, plan, calibration, plan_eval, store),
             "Save the dropped model under cache/dropped/",
             lambda save: run_dropping(store, loaded, plan, calibration, plan_eval, layers=layers,
                                       save_to=default_save_folder(loaded, plan) if save else None,
                                       progress=progress_callback("Dropping")))

st.subheader("Trade-off")
method_tradeoff(store, loaded, METHOD, evaluation, f"{METHOD}_tradeoff")

st.subheader("Export")
export_section(store, loaded, METHOD, METHOD)
