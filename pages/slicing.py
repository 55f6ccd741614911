"""Slicing page: SliceGPT with constant, LR-driven dynamic or custom per-layer schedules."""

import streamlit as st

from engine import charts
from engine.compression_runs import SlicingPlan, run_slicing, slicing_schedule
from engine.data import DataError
from engine.experiments import EvalPlan, grid
from engine.paths import cache_root
from engine.slicing import achieved_fraction, schedule_dims
from ui.session import require_model, results_store
from ui.widgets import calibration_and_evaluation, cancel_button, method_tradeoff, progress_callback, show_outcome

loaded = require_model()
store = results_store()
hidden = loaded.model.config.hidden_size
n_layers = loaded.num_layers

st.title("Slicing")
st.caption(
    "SliceGPT: fold norms, rotate the residual stream onto its principal components (fp64 PCA on "
    "calibration text) and drop the least important dimensions. Dynamic slicing gives redundant layers "
    "(high LR) more slicing: FS_i = SB + (SP − SB)·v_i / mean(v), v = min-max normalised LR."
)
calibration, evaluation, zero_shot = calibration_and_evaluation("slicing", loaded)
cols = st.columns(4)
source = cols[0].radio("Schedule", ["dynamic", "constant", "custom"], key="slicing_schedule",
                       format_func={"dynamic": "LR dynamic", "constant": "constant", "custom": "custom table"}.get)
target = cols[1].slider("Target average slicing %", 0, 50, 25, key="slicing_target") / 100
basis = cols[2].slider("Slicing basis SB %", 0, max(int(target * 100), 1), min(10, int(target * 100)),
                       key="slicing_basis", disabled=source != "dynamic") / 100
round_to = cols[3].number_input("Round dims to a multiple of", 1, 128, 8, key="slicing_round")
final_rotation = cols[3].checkbox("Final random rotation", key="slicing_rotation")
fractions = ()
if source == "custom":
    table = st.data_editor({"layer": list(range(n_layers)), "fraction": [target] * n_layers},
                           disabled=["layer"], key="slicing_custom", hide_index=True)
    fractions = tuple(float(f) for f in table["fraction"])
plan = SlicingPlan(source, target, basis, fractions, int(round_to), final_rotation)

if calibration is None or evaluation is None:
    st.stop()
st.subheader("Schedule preview")
if calibration.n_windows * calibration.seqlen < hidden:
    st.warning(
        f"Calibration has {calibration.n_windows * calibration.seqlen} tokens, fewer than the hidden size "
        f"({hidden}): the PCA is rank-deficient and sliced models lose much more. Use more windows."
    )
try:
    schedule = slicing_schedule(store, loaded, plan, calibration, progress_callback("LR scores"))
    dims = schedule_dims(schedule, hidden, int(round_to))
except (DataError, ValueError) as err:
    st.error(str(err))
    st.stop()
lr = list(schedule.lr_scores) if schedule.lr_scores else None
preview = charts.schedule_table(list(schedule.fractions), dims, hidden, lr)
st.plotly_chart(charts.schedule_chart(preview, calibration.label()), key="slicing_preview")
st.caption(
    f"Achieved mean slicing after rounding to {round_to}: {achieved_fraction(dims, hidden):.4f} "
    f"(asked {schedule.target:.4f}). LR from {calibration.label()} on {loaded.source}."
)

plan_eval = EvalPlan(evaluation, **zero_shot)
left, right = st.columns(2)
save = left.checkbox("Save the sliced model under cache/sliced/", key="slicing_save")
with right:
    cancel_button("slicing")
if left.button("Run slicing", type="primary"):
    name = f"{loaded.fingerprint}-{plan.series().replace(' ', '_')}-{target:g}"
    folder = str(cache_root() / "sliced" / name) if save else None
    try:
        outcome = run_slicing(store, loaded, plan, calibration, plan_eval, folder, progress_callback("Slicing"))
    except (DataError, ValueError) as err:
        st.error(str(err))
    else:
        show_outcome(outcome, loaded)

with right.popover("Sweep a grid"):
    targets = st.multiselect("Targets %", [5, 10, 15, 20, 25, 30, 40], [10, 20, 30], key="sweep_targets")
    bases = st.multiselect("Dynamic bases SB %", [0, 2, 5, 10, 15, 20], [0, 10], key="sweep_bases")
    if st.button("Run sweep (constant + dynamic)", key="sweep_run"):
        points = [("constant", t, t) for t in targets] + [("dynamic", t, b) for t, b in grid(targets, bases) if b <= t]
        bar = progress_callback("Sweep")
        for done, (kind, t, b) in enumerate(points):
            try:
                run_slicing(store, loaded, SlicingPlan(kind, t / 100, b / 100, (), int(round_to), final_rotation),
                            calibration, plan_eval)
            except ValueError as err:
                st.warning(f"{kind} SP={t}% SB={b}%: {err}")
            bar("runs", done + 1, len(points))

st.subheader("Trade-off")
method_tradeoff(store, loaded, "slicing", evaluation.label(), {
    "metrics.achieved_fraction": "average slicing fraction (after rounding)",
    "metrics.param_fraction": "parameters (fraction of dense, shortcuts included)",
})
