"""Quantization page: layer-wise mixed precision, layers ordered by LIM / ZD importance."""

from dataclasses import replace

import streamlit as st

from engine import charts
from engine.compression_runs import QuantPlan, allocation_for, run_quantization
from engine.data import DataError
from engine.experiments import EvalPlan, grid
from engine.quantize import size_report
from ui.session import require_model, results_store
from ui.widgets import calibration_and_evaluation, cancel_button, method_tradeoff, progress_callback, show_outcome

ORDER_LABELS = {"lim": "LIM (layer input modification)", "zd": "ZD (weight z-scores)", "random": "random (seeded)",
                "reversed-lim": "reversed LIM", "custom": "custom order"}
PREVIEW_WINDOWS = 4

loaded = require_model()
store = results_store()
n_layers = loaded.num_layers

st.title("Quantization")
st.caption(
    "Layer-wise mixed precision (METHODS §4): layers are ranked by importance and the least important move "
    "to the low bit level first. Weights are quantized group-wise (asymmetric, fp16 scale and zero point)."
)
if loaded.note:
    st.caption("The built-in model was distributed at 4 bits: 3- and 2-bit levels are the informative ones.")
calibration, evaluation, zero_shot = calibration_and_evaluation("quant", loaded)
cols = st.columns(4)
quantizer = cols[0].selectbox("Quantizer", ["rtn", "gptq"], key="quant_method",
                              format_func={"rtn": "round-to-nearest", "gptq": "GPTQ (calibrated)"}.get)
group_size = cols[0].selectbox("Group size", [32, 64, 128, 256], index=2, key="quant_group")
zero_point = cols[0].radio("Zero point", ["integer", "float"], key="quant_zero", horizontal=True,
                           help="integer: GPTQ-style grid; float: fp16 group minimum (Q4_1 style).")
high_bits = cols[1].select_slider("High bits", list(range(2, 9)), 4, key="quant_high")
low_bits = cols[1].select_slider("Low bits", list(range(2, 9)), 2, key="quant_low")
mode = cols[2].radio("Allocate by", ["fraction", "average"], key="quant_mode",
                     format_func={"fraction": "fraction of layers at low bits", "average": "target average bits"}.get)
low_fraction = target_bits = None
if mode == "fraction":
    low_fraction = cols[2].slider("Layers at low bits %", 0, 100, 25, key="quant_fraction") / 100
else:
    target_bits = cols[2].number_input("Target average bits", 2.0, 8.0, 3.25, 0.125, key="quant_target")
ordering = cols[3].selectbox("Ordering", list(ORDER_LABELS), format_func=ORDER_LABELS.get, key="quant_order")
seed = cols[3].number_input("Random seed", 0, 10_000, 0, key="quant_seed", disabled=ordering != "random")
custom = ()
if ordering == "custom":
    table = st.data_editor({"position (least important first)": list(range(n_layers)), "layer": list(range(n_layers))},
                           disabled=["position (least important first)"], key="quant_custom", hide_index=True)
    custom = tuple(int(v) for v in table["layer"])
plan = QuantPlan(quantizer, group_size, high_bits, low_bits, low_fraction, target_bits, ordering, custom, int(seed),
                 zero_point)

if calibration is None or evaluation is None:
    st.stop()
st.subheader("Bit map preview")
try:
    allocation, importance = allocation_for(store, loaded, plan, calibration, progress_callback("Importance scores"))
    spec = plan.spec()
except (DataError, ValueError) as err:
    st.error(str(err))
    st.stop()
bit_table = charts.bit_map_table(list(allocation.bits), importance, "−ZD" if ordering == "zd" else "LIM")
st.plotly_chart(charts.bit_map_chart(bit_table, f"{loaded.source}; order {ORDER_LABELS[ordering]}"),
                key="quant_preview")
size = size_report(loaded.model, loaded.architecture, allocation.bits, spec)
st.caption(
    f"Average {allocation.average_bits:.3f} code bits per layer ({allocation.note}); "
    f"{size.bits_per_weight:.3f} bits per quantized weight with scales and zeros; model "
    f"{size.total_bytes / 2**20:.1f} MiB = {size.compression:.3f} of dense, of which "
    f"{size.unquantized_bytes / 2**20:.1f} MiB stay unquantized ({', '.join(k for k, v in size.unquantized.items() if v)}). "
    f"Scores from {calibration.label()}."
)

left, mid, right = st.columns(3)
with right:
    cancel_button("quantization")
full_plan = EvalPlan(evaluation, **zero_shot)
preview_plan = EvalPlan(replace(evaluation, n_windows=min(PREVIEW_WINDOWS, evaluation.n_windows)))
preview = left.button(f"Preview ({PREVIEW_WINDOWS} windows)", type="primary")
full = mid.button("Full evaluation")
if preview or full:
    try:
        outcome = run_quantization(store, loaded, plan, calibration, preview_plan if preview else full_plan,
                                   None, progress_callback("Quantizing"))
    except (DataError, ValueError) as err:
        st.error(str(err))
    else:
        for warning in outcome.config.get("warnings", []):
            st.warning(warning)
        show_outcome(outcome, loaded)

with right.popover("Ordering sweep (the paper's chart)"):
    fractions = st.multiselect("Layers at low bits %", [0, 10, 25, 50, 75, 100], [0, 25, 50, 75, 100], key="qs_f")
    orders = st.multiselect("Orderings", ["lim", "zd", "random"], ["lim", "zd", "random"], key="qs_o")
    if st.button("Run sweep", key="qs_run"):
        points = grid(orders, fractions)
        bar = progress_callback("Sweep")
        for done, (order, fraction) in enumerate(points):
            sweep_plan = replace(plan, low_fraction=fraction / 100, target_bits=None, ordering=order)
            run_quantization(store, loaded, sweep_plan, calibration, full_plan)
            bar("runs", done + 1, len(points))

st.subheader("Trade-off")
method_tradeoff(store, loaded, "quantization", evaluation.label(), {
    "config.low_fraction": "fraction of layers at the low bit level",
    "metrics.size_fraction": "bytes (fraction of dense)",
    "metrics.avg_bits": "average code bits per layer",
})
