"""Compare methods: quality against size for every method on one chart, and a sweep at matched sizes."""

import streamlit as st

from engine.core.architectures import Feature
from engine.core.data import DataError, token_windows
from engine.core.out_of_memory import RunOutOfMemory
from engine.export.ct_folder import default_group_size
from engine.quant.grid import LLAMACPP
from engine.runs.cached_scores import compute_scores
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan, StackPlan
from engine.runs.runner import run, run_estimate, run_stacked, sweep_estimate
from engine.runs.summary import executive_summary, quantization_vs_dropping
from engine.runs.sweeps import matched_size_sweep, parse_sizes, run_sweep
from engine.viz.tradeoff import (
    filter_runs,
    quality_axes,
    runs_on_other_windows,
    tradeoff_figure,
    with_method_series,
)
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.sidebar import target_runtime
from ui.state import kept
from ui.widgets import (
    calibration_and_evaluation,
    cancel_button,
    cost_threshold,
    progress_callback,
    show_chart,
    show_outcome,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py

SIZES = [0.9, 0.75, 0.6, 0.5]

loaded = require_model()
store = results_store()

st.title("Compare methods")
st.caption(
    "For the same memory, which method keeps the model best? Every stored run of this model on the chosen "
    "evaluation windows, one series per method and setting, against size as a fraction of the dense model's "
    "bytes at 16 bits (quantized codes with their scales and zeros; shortcut matrices and untied heads of "
    "sliced models included)."
)
calibration, evaluation, zero_shot = calibration_and_evaluation(loaded)
if calibration is None or evaluation is None:
    st.stop()
plan_eval = EvalPlan(evaluation, **zero_shot)
runtime = target_runtime()  # the sweep and the stack quantize only as it runs
own = "" if not runtime.deployable else f"_{runtime.key}"  # widgets whose options the runtime narrows
quantizers = [LLAMACPP] if runtime.quantizers == (LLAMACPP,) else ["rtn", "gptq"]
zero_point = runtime.default_zero_point
group_size = default_group_size(loaded, runtime)  # one its checkpoint can hold for this model's widths

with st.expander("Sweep every method at matched sizes"):
    text = st.text_input("Sizes (fractions of dense bytes)", ", ".join(f"{s:g}" for s in SIZES),
                         key=kept("cmp_sizes"))
    quantizer = st.radio("Quantizer", quantizers, horizontal=True, key=kept(f"cmp_quantizer{own}"))
    sizes, points = SIZES, []
    try:
        sizes = parse_sizes(text)
        points = matched_size_sweep(loaded, sizes, QuantPlan(quantizer=quantizer, group_size=group_size,
                                                             zero_point=zero_point, runtime=runtime.key))
    except ValueError as err:
        st.error(str(err))
    st.caption("Planned: " + ("; ".join(f"{p.method} {p.plan.series()} ({p.plan.setting()}) → {p.predicted_size:.1%}"
                                        for p in points)
                             or "nothing reaches these sizes")
               + ". Slicing is not planned (on small models sliced models outgrow dense up to ~25%); its stored "
               "runs still appear on the chart.")
    left, right = st.columns(2)
    if points and left.button(f"Run the sweep ({len(points)} runs, "
                              f"{sweep_estimate(loaded, points, calibration, plan_eval, store)})", type="primary",
                              key="compare_sweep"):
        with right:
            cancel_button("compare")
        try:
            compute_scores(store, loaded, calibration, progress=progress_callback("Scores"))
            result = run_sweep(points, lambda p: run(store, loaded, p.plan, calibration, plan_eval),
                               progress_callback(f"Sweep of {len(points)} runs"))
        except (DataError, RunOutOfMemory) as err:
            st.error(str(err))
        else:
            st.success(f"{len(result.outcomes)} runs stored.")
            for failed, message in result.errors:
                st.warning(f"{failed.method} {failed.plan.series()}: {message}")

with st.expander("Stack two methods: slice or drop, then quantize"):
    cols = st.columns(3)
    can_slice = loaded.architecture.reason(Feature.SLICING) is None
    first_kind = cols[0].radio("First", ["slice", "drop layers"] if can_slice else ["drop layers"],
                               key=kept("stack_first"),
                               help="SliceGPT's final rotation is meant to help later quantization.")
    if first_kind == "slice":
        first = SlicingPlan("constant", cols[1].slider("Slicing SP %", 5, 40, 20, key=kept("stack_sp")) / 100,
                            final_rotation=cols[1].checkbox("Final random rotation", True, key=kept("stack_rot")))
    else:
        first = DropPlan("layer", cols[1].slider("Layers to drop", 1, loaded.num_layers - 2, 4,
                                                 key=kept("stack_drop")))
    levels = [b for b in range(2, 9) if b in runtime.levels]
    high = cols[2].select_slider("Then quantize: high bits", levels, 4 if 4 in levels else max(levels),
                                 key=kept(f"stack_high{own}"))
    low = cols[2].select_slider("low bits", levels, 4 if 4 in levels else min(levels), key=kept(f"stack_low{own}"))
    fraction = cols[2].slider("layers at low bits %", 0, 100, 0, key=kept("stack_fraction")) / 100
    then = QuantPlan(quantizers[0], group_size, high, low, fraction, ordering="lim", zero_point=zero_point,
                     runtime=runtime.key)
    stack_cost = run_estimate(loaded, StackPlan(first, then), calibration, plan_eval, store)
    if st.button(f"Run the stack ({stack_cost})", key="compare_stack",
                 help="Both stages work on copies; the record stores each stage's plan."):
        try:
            outcome = run_stacked(store, loaded, first, then, calibration, plan_eval,
                                  progress=progress_callback("Stack"))
        except (DataError, ValueError) as err:
            st.error(str(err))
        else:
            show_outcome(outcome, loaded)

label = token_windows(evaluation, loaded.tokenizer, loaded.max_seqlen).label()
every = filter_runs(store.runs_frame(model=loaded.source), fingerprint=loaded.fingerprint)
runs = filter_runs(every, data_label=label)
if runs.empty or runs[runs["method"] != "dense"].empty:
    st.info(f"No compressed runs on {label} yet: run the sweep above, or compress on the method pages."
            + runs_on_other_windows(every, label))
    st.stop()
runs = with_method_series(runs)
quality = quality_axes(runs)
y = st.selectbox("Quality", list(quality), format_func=quality.get, key=kept("cmp_y"))
subtitle = f"{loaded.source}; {label}"
figure = tradeoff_figure(runs, "metrics.size_fraction", y, subtitle)
show_chart(figure, "methods_tradeoff",
           f"Computed on: {subtitle}. Dense (black star) on the same windows; grey band: Pareto frontier over all "
           "methods; previews hollow and dashed; bars: 95% intervals.",
           runs[["id", "method", "series", "metrics.size_fraction", y]])
st.subheader("What this says")
threshold = cost_threshold()
lines = executive_summary(runs, label, threshold=threshold)
lines.append("The paper's claim, quantization beats dropping at equal size unless 2-bit: "
             + quantization_vs_dropping(runs))
st.markdown("\n".join(f"- {line}" for line in lines))
