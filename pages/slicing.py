"""Slicing page: SliceGPT with constant, LR-driven dynamic or custom per-layer schedules."""

import streamlit as st

from engine.core.architectures import Feature
from engine.methods import Slicing
from engine.methods.slicing import slicing_schedule
from engine.runs.plans import EvalPlan, SlicingPlan
from engine.runs.runner import default_save_folder, run_estimate, run_slicing, sweep_estimate
from engine.runs.sweeps import run_sweep, slicing_sweep
from engine.slicing.schedules import (
    achieved_fraction,
    flat_schedule_note,
    schedule_dims,
)
from engine.slicing.slice_model import pca_rank_warning
from engine.viz import charts
from ui.export_panel import export_section
from ui.navigation import enter_through_the_router
from ui.optimizer_panels import slicing_optimizer_panel
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
METHOD = Slicing.name  # this page's method, as its runs are stored

loaded = require_model()
store = results_store()
hidden = loaded.hidden_size
n_layers = loaded.num_layers

st.title("Slicing")
st.caption(
    "SliceGPT: fold norms, rotate the residual stream onto its principal components (fp64 PCA on "
    "calibration text) and drop the least important dimensions. Dynamic slicing gives redundant layers "
    "(high LR) more slicing: FS_i = SB + (SP − SB)·v_i / mean(v), v = min-max normalised LR."
)

if (runs_in := Slicing().deployment(SlicingPlan(), target_runtime())) is not None:
    st.info(runs_in)
unavailable = loaded.architecture.unavailable_message(Feature.SLICING)
if unavailable:  # before any control: nothing to set up for a run that would be refused
    st.warning(unavailable + " Dropping whole layers works on every model.")
    st.stop()
calibration, evaluation, zero_shot = calibration_and_evaluation(loaded)
cols = st.columns(4)
source = cols[0].radio("Schedule", ["dynamic", "constant", "custom", "best"], key=kept("slicing_schedule"),
                       format_func={"dynamic": "LR dynamic", "constant": "constant", "custom": "custom table",
                                    "best": "find the best (measured)"}.get)
target = cols[1].slider("Target average slicing SP %", 0, 50, 25, key=kept("slicing_target")) / 100
basis = cols[2].slider("Slicing basis SB % (≤ SP)", 0, 50, 10, key=kept("slicing_basis"),
                       disabled=source not in ("dynamic",),
                       help="The least redundant layer is sliced by SB; SB = SP is constant slicing.") / 100
with cols[3].expander("Advanced"):  # folded: today's defaults suit a first run
    round_to = st.number_input("Round dims to a multiple of", 1, 128, 8, key=kept("slicing_round"),
                               help="Sliced widths are rounded to this multiple (faster matrix multiplies).")
    final_rotation = st.checkbox("Final random rotation", key=kept("slicing_rotation"),
                                 help="A random rotation of the sliced residual stream, meant to help a later "
                                 "quantization (stacking).")
if source == "best":
    if calibration is None or evaluation is None:
        st.stop()
    slicing_optimizer_panel(store, loaded, calibration, EvalPlan(evaluation, **zero_shot), target, int(round_to))
    st.subheader("Trade-off")
    method_tradeoff(store, loaded, METHOD, evaluation, f"{METHOD}_tradeoff")
    st.stop()
fractions = ()
if source == "custom":
    table = st.data_editor({"layer": list(range(n_layers)), "fraction": [target] * n_layers},
                           disabled=["layer"], key="slicing_custom", hide_index=True)
    fractions = tuple(float(f) for f in table["fraction"])
plan = SlicingPlan(source, target, basis, fractions, int(round_to), final_rotation)

if calibration is None or evaluation is None:
    st.stop()
if source == "dynamic" and basis > target:
    st.error(f"The slicing basis SB ({basis:.0%}) cannot exceed the target SP ({target:.0%}): lower SB or raise SP.")
    st.stop()
st.subheader("Schedule preview")
warning = pca_rank_warning(calibration.n_windows * calibration.seqlen, hidden)
if warning:
    st.warning(warning)
schedule = preview_or_stop(lambda: slicing_schedule(store, loaded, plan, calibration, compute=False),
                           store, loaded, calibration, "The dynamic schedule")
dims = preview_or_stop(lambda: schedule_dims(schedule, hidden, int(round_to)), store, loaded, calibration, "")
lr = list(schedule.lr_scores) if schedule.lr_scores else None
preview = charts.schedule_table(list(schedule.fractions), dims, hidden, lr)
show_chart(charts.schedule_chart(preview, f"{loaded.source}; LR from {calibration.label()}"), "slicing_schedule",
           f"Achieved mean slicing after rounding to {round_to}: {achieved_fraction(dims, hidden):.4f} "
           f"(asked {schedule.target:.4f}). LR from {calibration.label()} on {loaded.source}.", preview)
flat_note = flat_schedule_note(schedule)
if flat_note:
    st.info(flat_note)

plan_eval = EvalPlan(evaluation, **zero_shot)
memory_note(loaded, plan, calibration, plan_eval, schedule)
run_controls(loaded, METHOD, run_estimate(loaded, plan, calibration, plan_eval, store),
             "Save the sliced model under cache/sliced/",
             lambda save: run_slicing(store, loaded, plan, calibration, plan_eval, schedule=schedule,
                                      save_to=default_save_folder(loaded, plan) if save else None,
                                      progress=progress_callback("Slicing")))

with st.popover("Sweep a grid"):
    targets = st.multiselect("Targets %", [5, 10, 15, 20, 25, 30, 40], [10, 20, 30], key=kept("sweep_targets"))
    bases = st.multiselect("Dynamic bases SB %", [0, 2, 5, 10, 15, 20], [0, 10], key=kept("sweep_bases"))
    plans = slicing_sweep(plan, [t / 100 for t in targets], [b / 100 for b in bases])
    if st.button(f"Run sweep (constant + dynamic: {len(plans)} runs, "
                 f"{sweep_estimate(loaded, plans, calibration, plan_eval, store)})", key="sweep_run"):
        result = run_sweep(plans, lambda p: run_slicing(store, loaded, p, calibration, plan_eval),
                           progress_callback(f"Sweep of {len(plans)} runs"))
        st.success(f"{len(result.outcomes)} runs stored.")
        for failed, message in result.errors:
            st.warning(f"{failed.series()} SP={failed.target:.0%}: {message}")

st.subheader("Trade-off")
method_tradeoff(store, loaded, METHOD, evaluation, f"{METHOD}_tradeoff")

st.subheader("Export")
export_section(store, loaded, METHOD, METHOD)
