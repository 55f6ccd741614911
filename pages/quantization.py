"""Quantization page: layer-wise mixed precision, layers ordered by LIM / ZD importance."""

from dataclasses import replace

import streamlit as st

from engine.core.data import DataError
from engine.export.ct_folder import ct_group_sizes, default_group_size
from engine.export.gguf_llamacpp import llamacpp_details
from engine.llamacpp.runtime import status as llamacpp_status
from engine.methods import Quantization
from engine.methods.quantization import allocation_for
from engine.quant.ggml_types import OUTPUT_TYPES, TYPE_SETS
from engine.quant.grid import LLAMACPP, METHODS, ZERO_POINTS
from engine.quant.size import describe_size, size_report
from engine.runs.cached_scores import compute_scores
from engine.runs.plans import PREVIEW_WINDOWS, EvalPlan, QuantPlan
from engine.runs.runner import run_estimate, run_quantization, sweep_estimate
from engine.runs.sweeps import quantization_sweep, run_sweep
from engine.viz import charts
from ui.export_panel import export_section
from ui.navigation import enter_through_the_router
from ui.optimizer_panels import bits_optimizer_panel
from ui.session import require_model, results_store
from ui.sidebar import target_runtime
from ui.state import kept
from ui.widgets import (
    calibration_and_evaluation,
    cancel_button,
    memory_note,
    method_tradeoff,
    preview_or_stop,
    progress_callback,
    show_chart,
    show_outcome,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py
METHOD = Quantization.name  # this page's method, as its runs are stored

ORDER_LABELS = {"lim": "LIM (layer input modification)", "zd": "ZD (weight z-scores)", "random": "random (seeded)",
                "reversed-lim": "reversed LIM", "custom": "custom order"}

QUANTIZERS = {"rtn": "round-to-nearest", "gptq": "GPTQ (calibrated)", LLAMACPP: "llama.cpp types (exact GGUF)"}

loaded = require_model()
store = results_store()
n_layers = loaded.num_layers

st.title("Quantization")
st.caption(
    "Layer-wise mixed precision (docs/methods.md §4): layers are ranked by importance and the least important move "
    "to the low bit level first. Weights are quantized group-wise (fp16 scale, and a zero point unless symmetric)."
)

runtime = target_runtime()
if loaded.note and min(runtime.levels) < 4:
    st.caption("The built-in model was distributed at 4 bits: 3- and 2-bit levels are the informative ones.")
own = "" if runtime.key == "research" else f"_{runtime.key}"  # widgets whose options the runtime narrows
st.info(f"Target runtime: **{runtime.label}** (sidebar). " + (
    "Only what it runs as it is is offered below; every run records it." if runtime.deployable else
    "Every setting is offered: results show what compression does, not a file a runtime serves as is."))
calibration, evaluation, zero_shot = calibration_and_evaluation(loaded)
choose = st.radio("Choose the bits", ["ordering", "optimizer"], key=kept("quant_choose"), horizontal=True,
                  format_func={"ordering": "by an importance ordering (the paper)",
                               "optimizer": "optimize for a size budget (measured)"}.get)
cols = st.columns(4)
quantizer = cols[0].selectbox("Quantizer", [q for q in METHODS if q in runtime.quantizers],
                              key=kept(f"quant_method{own}"), format_func=QUANTIZERS.get,
                              help="round-to-nearest and GPTQ use LayerLab's research grid (group-wise fp16 scales); "
                              "llama.cpp types are llama.cpp's own quantizer and block formats: the run is, bit for "
                              "bit, the GGUF file it exports, and its size is that file's.")
act_order, group_size, zero_point = False, 128, "integer"
ggml_types, imatrix, output_type = "k-quants", False, "auto"
if quantizer == LLAMACPP:
    found = llamacpp_status()
    if not found.available:
        st.warning(f"llama.cpp types are unavailable here: {found.reason}")
        st.stop()
    ggml_types = cols[0].selectbox("llama.cpp types", list(TYPE_SETS), key=kept("quant_ggml_types"),
                                   format_func=lambda t: f"{t}: " + ", ".join(f"{b}→{q}"
                                                                               for b, q in TYPE_SETS[t].items()))
    imatrix = cols[0].checkbox("importance matrix (imatrix)", key=kept("quant_imatrix"),
                               help="Weight each rounding error by how strongly its input column is used on the "
                               "calibration windows, as llama-quantize --imatrix does.")
    output_type = cols[0].selectbox("Embedding / output type", list(OUTPUT_TYPES), key=kept("quant_output_type"),
                                    help="auto: llama.cpp's rule (Q6_K, or Q8_0 when rows are not a multiple of 256).")
    level_options = [b for b in TYPE_SETS[ggml_types] if b in runtime.levels]
    level_label = lambda b: f"{b} ({TYPE_SETS[ggml_types][b]})"  # noqa: E731
else:
    advanced = cols[0].expander("Advanced: the grid")  # folded: today's defaults suit a first run
    if quantizer == "gptq" and runtime.act_order:  # no box at all rather than a greyed one
        act_order = advanced.checkbox("GPTQ act-order", value=True, key=kept("quant_act_order"),
                                     help="Quantize columns by decreasing activation energy, group scales fixed in "
                                     "the original column order ('static' groups). Helps most on models whose "
                                     "weights were quantized before (like the built-in one).")
    groups = [g for g in (32, 64, 128, 256) if g in runtime.group_sizes]
    if runtime.export == "ct":  # only group sizes the compressed-tensors checkpoint can hold for this model
        groups = [g for g in groups if g in ct_group_sizes(loaded)] or groups
    start = default_group_size(loaded, runtime)
    group_size = advanced.selectbox("Group size", groups, index=groups.index(start) if start in groups else
                                    len(groups) - 1, key=kept(f"quant_group{own}"),
                                    help="Weights per fp16 scale (and zero point): smaller groups are more "
                                    "accurate and larger.")
    zero_point = advanced.radio("Zero point", [z for z in ZERO_POINTS if z in runtime.zero_points],
                               key=kept(f"quant_zero{own}"), horizontal=True,
                               help="integer: GPTQ-style asymmetric grid, a zero point per group (the lower error; "
                               "exports exactly as a compressed-tensors folder for vLLM); float: fp16 group minimum "
                               "(Q4_1 style); symmetric: zero fixed at the middle code, not stored (exports exactly "
                               "as a compressed-tensors folder for transformers / vLLM, and as GGUF Q4_0 / Q5_0 / "
                               "Q8_0).")
    level_options = [b for b in range(2, 9) if b in runtime.levels]
    level_label = str
if choose == "optimizer":
    if calibration is None or evaluation is None:
        st.stop()
    if quantizer == LLAMACPP and ggml_types != "k-quants":
        st.info("The optimizer measures llama.cpp's k-quant types (levels 2-6 and 8): choose the k-quants type set "
                "to optimize, or allocate the legacy types by an ordering.")
        st.stop()
    bits_optimizer_panel(store, loaded, calibration, EvalPlan(evaluation, **zero_shot), quantizer, group_size,
                         level_options, imatrix, output_type, runtime.key)
    st.subheader("Trade-off")
    method_tradeoff(store, loaded, METHOD, evaluation, f"{METHOD}_tradeoff")
    st.subheader("Export")
    export_section(store, loaded, METHOD, METHOD)
    st.stop()
# each level set keeps its own sliders
family = f"_ggml_{ggml_types}" if quantizer == LLAMACPP else own
low_start = 2 if 2 in level_options else min(level_options)  # 4/2 bits; vLLM's 8/4
high_start = min([b for b in level_options if b > low_start and b >= 4], default=max(level_options))
high_bits = cols[1].select_slider("High bits", level_options, high_start, format_func=level_label,
                                  key=kept(f"quant_high{family}"))
low_bits = cols[1].select_slider("Low bits", level_options, low_start, format_func=level_label,
                                 key=kept(f"quant_low{family}"))
mode = cols[2].radio("Allocate by", ["fraction", "average"], key=kept("quant_mode"),
                     format_func={"fraction": "fraction of layers at low bits", "average": "target average bits"}.get)
low_fraction = target_bits = None
if mode == "fraction":
    low_fraction = cols[2].slider("Layers at low bits %", 0, 100, 25, key=kept("quant_fraction")) / 100
else:
    target_bits = cols[2].number_input("Target average bits", 2.0, 8.0, 3.25, 0.125, key=kept("quant_target"))
ordering = cols[3].selectbox("Ordering", list(ORDER_LABELS), format_func=ORDER_LABELS.get, key=kept("quant_order"))
seed = cols[3].number_input("Random seed", 0, 10_000, 0, key=kept("quant_seed"), disabled=ordering != "random")
custom = ()
if ordering == "custom":
    table = st.data_editor({"position (least important first)": list(range(n_layers)), "layer": list(range(n_layers))},
                           disabled=["position (least important first)"], key="quant_custom", hide_index=True)
    custom = tuple(int(v) for v in table["layer"])
plan = QuantPlan(quantizer, group_size, high_bits, low_bits, low_fraction, target_bits, ordering, custom, int(seed),
                 zero_point, act_order, ggml_types, imatrix, output_type, runtime.key)

if calibration is None or evaluation is None:
    st.stop()
st.subheader("Bit map preview")
allocation, importance = preview_or_stop(lambda: allocation_for(store, loaded, plan, calibration, compute=False),
                                         store, loaded, calibration, "This ordering")
spec = preview_or_stop(plan.spec, store, loaded, calibration, "")
bit_table = charts.bit_map_table(list(allocation.bits), importance, "−ZD" if ordering == "zd" else "LIM")
size = size_report(loaded.model, loaded.architecture, allocation.bits, spec, runtime.packs_zero_points)
size_text = describe_size(size)
if quantizer == LLAMACPP:
    details = llamacpp_details(loaded, spec, allocation.bits)
    types = ", ".join(f"{qtype} ×{n}" for qtype, n in details.get("tensor_types", {}).items())
    size_text = (f"{size.bits_per_weight:.3f} bits per weight in the decoder linears as llama.cpp stores them; "
                 + (f"GGUF file {details['file_bytes'] / 2**20:.1f} MiB (= the exported file's bytes). "
                    if details["file_bytes"] else f"{details.get('file_note', '')} ")
                 + f"Types: {types}.")
show_chart(charts.bit_map_chart(bit_table, f"{loaded.source}; order {ORDER_LABELS[ordering]}"), "bit_map",
           f"Average {allocation.average_bits:.3f} code bits per layer ({allocation.note}); {size_text} "
           f"Scores from {calibration.label()}. For {runtime.label}.", bit_table)

left, mid, right = st.columns(3)
full_plan = EvalPlan(evaluation, **zero_shot)
preview_plan = EvalPlan(replace(evaluation, n_windows=min(PREVIEW_WINDOWS, evaluation.n_windows)), preview=True)
preview = left.button(f"Preview ({preview_plan.data.n_windows} windows, "
                      f"{run_estimate(loaded, plan, calibration, preview_plan, store)})",
                      type="primary", key="quant_preview",
                      help="A quick, noisy look: stored and drawn as a preview, with dense on the same windows.")
full = mid.button(f"Full evaluation ({evaluation.n_windows} windows, "
                  f"{run_estimate(loaded, plan, calibration, full_plan, store)})", key="quant_full")
memory_note(loaded, plan, calibration, full_plan, allocation)
if preview or full:
    with right:
        cancel_button(METHOD)
    try:
        outcome = run_quantization(store, loaded, plan, calibration, preview_plan if preview else full_plan,
                                   allocation=allocation, progress=progress_callback("Quantizing"))
    except (DataError, ValueError) as err:
        st.error(str(err))
    else:
        show_outcome(outcome, loaded)

with right.popover("Ordering sweep (the paper's chart)"):
    fractions = st.multiselect("Layers at low bits %", [0, 10, 25, 50, 75, 100], [0, 25, 50, 75, 100],
                               key=kept("qs_f"))
    orders = st.multiselect("Orderings", ["lim", "zd", "random"], ["lim", "zd", "random"], key=kept("qs_o"))
    plans = quantization_sweep(plan, [low_bits], orders, [f / 100 for f in fractions])
    if st.button(f"Run sweep ({len(plans)} runs, {sweep_estimate(loaded, plans, calibration, full_plan, store)})",
                 key="qs_run"):
        try:
            compute_scores(store, loaded, calibration, progress=progress_callback("Importance scores"))
        except (DataError, ValueError) as err:
            st.error(str(err))
            st.stop()
        result = run_sweep(plans, lambda p: run_quantization(store, loaded, p, calibration, full_plan),
                           progress_callback(f"Sweep of {len(plans)} runs"))
        st.success(f"{len(result.outcomes)} runs stored.")
        for failed, message in result.errors:
            st.warning(f"{failed.series()}: {message}")

st.subheader("Trade-off")
method_tradeoff(store, loaded, METHOD, evaluation, f"{METHOD}_tradeoff")

st.subheader("Export")
export_section(store, loaded, METHOD, METHOD)
