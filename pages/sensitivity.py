"""Sensitivity page: what each action really costs on each layer, and how well LR, LIM and ZD predict it."""

import re

import streamlit as st

from engine.core.data import DataError
from engine.core.out_of_memory import RunOutOfMemory
from engine.export.ct_folder import default_group_size
from engine.llamacpp.runtime import status as llamacpp_status
from engine.quant.grid import LLAMACPP, MAX_BITS, MIN_BITS
from engine.runs.cached_scores import compute_scores, scores_if_cached
from engine.sensitivity.actions import DEFAULT_GROUP_SIZE, QUANT_KINDS, Action, check_supported
from engine.sensitivity.agreement import RESAMPLES, layer_scores
from engine.sensitivity.cached import (
    cached_agreement,
    check_actions,
    measure_sensitivity,
    scan_estimate,
    sensitivity_if_cached,
)
from engine.sensitivity.errors import SensitivityError, UnsupportedActionError
from engine.sensitivity.findings import score_names, sensitivity_finding
from engine.slicing.slice_model import pca_rank_warning
from engine.viz import sensitivity_charts as charts
from ui.navigation import enter_through_the_router
from ui.session import require_model, results_store
from ui.sidebar import target_runtime
from ui.state import kept
from ui.widgets import (
    cancel_button,
    computed_on,
    data_spec_controls,
    progress_callback,
    show_chart,
)

enter_through_the_router()  # a page opened by its own URL on a new server goes through app.py

ACTION_KINDS = {"rtn": "quantize (RTN)", "gptq": "quantize (GPTQ)", LLAMACPP: "quantize (llama.cpp k-quant types)",
                "slice": "slice", "drop": "drop layer", "drop-attn": "drop attention", "drop-mlp": "drop MLP"}

loaded = require_model()
store = results_store()

st.title("Sensitivity")
st.caption(
    "Apply one action to one layer at a time, everything else dense, and measure the damage on calibration "
    "text: KL divergence of the next-token distribution to the dense model's (nats per token, primary) and "
    "the change in mean NLL. Then see how well the layer scores (LR, LIM, ZD, outlier counts, block cosines) "
    "rank that measured cost: Spearman ρ with a bootstrap 95% interval over windows."
)
spec = data_spec_controls("calibration", loaded)
runtime = target_runtime()  # quantization actions as the target runtime runs them
own = "" if not runtime.deployable else f"_{runtime.key}"
offered, refused = {}, []
for kind, name in ACTION_KINDS.items():  # only what this model (and the target runtime) can do is offered
    if kind in QUANT_KINDS and kind not in runtime.quantizers:
        refused.append(f"{name}: {runtime.label} does not run it (sidebar).")
        continue
    if kind == LLAMACPP and not llamacpp_status().available:
        refused.append(f"{name}: {llamacpp_status().reason}")
        continue
    try:
        probe = {"slice": {"fraction": 0.25}, "rtn": {"bits": 4}, "gptq": {"bits": 4},
                 LLAMACPP: {"bits": 4}}.get(kind, {})
        check_supported(Action(kind, **probe), loaded.architecture, loaded.hidden_size)
        offered[kind] = name
    except UnsupportedActionError as err:
        refused.append(f"{name}: {err}")
if refused:
    st.caption("Not offered for this model: " + " ".join(refused))
cols = st.columns([3, 2, 2, 2])
chosen = [k for k in ("rtn" if "rtn" in offered else LLAMACPP, "slice", "drop") if k in offered]
kinds = cols[0].multiselect("Actions (each on one layer at a time)", list(offered), chosen,
                            format_func=ACTION_KINDS.get, key=kept(f"sens_actions{own}"))
levels = [b for b in range(MIN_BITS, MAX_BITS + 1) if b in runtime.levels]
bits = cols[1].multiselect("Bit levels (RTN / GPTQ; llama.cpp: 2→Q2_K … 6→Q6_K, 8→Q8_0)", levels,
                           [3] if 3 in levels else [min(levels)],
                           key=kept(f"sens_bits{own}"), disabled=not set(kinds) & set(QUANT_KINDS))
start = default_group_size(loaded, runtime) or DEFAULT_GROUP_SIZE  # vLLM on SmolLM2's 576-wide rows: 64
group_size = cols[1].number_input("Group size", 8, 8192, start, 8, key=kept(f"sens_group{own}"),
                                  disabled=not set(kinds) & set(QUANT_KINDS))
WHOLE_LAYER = "whole layer"
modules = cols[1].multiselect("Quantize which linears", [WHOLE_LAYER, *loaded.architecture.linears], [WHOLE_LAYER],
                              key=kept("sens_modules"), disabled=not set(kinds) & set(QUANT_KINDS),
                              help="One linear at a time (e.g. down) shows which module types carry the damage; "
                              "each is a scan of its own.")
fraction = cols[2].slider("Slicing fraction %", 5, 90, 25, 5, key=kept("sens_slice"),
                          disabled="slice" not in kinds) / 100
k = cols[3].number_input("Outlier threshold k (|z| > k)", 1.0, 20.0, 3.0, 0.5, key=kept("scores_k"))
if spec is None:
    st.stop()
rank_warning = pca_rank_warning(spec.n_windows * spec.seqlen if spec.n_windows else 10**9, loaded.hidden_size)
if "slice" in kinds and rank_warning:
    st.warning(rank_warning + " On this calibration sample itself the measured slicing damage is then near 0 "
               "(the dimensions sliced away carry none of its variance), which says nothing about other text.")

try:
    if set(kinds) & set(QUANT_KINDS) and not bits:
        raise SensitivityError("Pick at least one bit level for the quantization actions.")
    if set(kinds) & set(QUANT_KINDS) and not modules:
        raise SensitivityError("Pick what to quantize: the whole layer or at least one of its linears.")
    actions = []
    for kind in kinds:
        if kind in QUANT_KINDS:
            actions += [Action(kind, bits=int(b), group_size=None if kind == LLAMACPP else int(group_size),
                               module=None if module == WHOLE_LAYER else module,
                               zero_point=None if kind == LLAMACPP or runtime.zero_point_at(int(b)) == "integer"
                               else runtime.zero_point_at(int(b)))  # transformers, vLLM's 8 bits: symmetric
                        for b in sorted(bits) for module in modules]
        else:
            actions.append(Action(kind, fraction=fraction) if kind == "slice" else Action(kind))
    check_actions(loaded, actions)
    matrix = sensitivity_if_cached(store, loaded, spec, actions)
    scores = scores_if_cached(store, loaded, spec, k)
    estimate = scan_estimate(store, loaded, spec, actions)
except (DataError, SensitivityError) as err:
    st.error(str(err))
    st.stop()

if matrix is None or scores is None:
    extra = "" if scores is not None else " + one scoring pass"
    labels = {a.key: a.label for a in actions}
    per_action = ", ".join(f"{labels[key]} {value:.1f}" for key, value in estimate.per_action.items())
    st.markdown(f"**Cost estimate**: {estimate.text()}{extra}; {estimate.cached} of {len(actions)} actions cached."
                + (f" Forward-equivalents per action over all {loaded.num_layers} layers (each layer re-runs only "
                   f"the layers after it): {per_action}." if per_action else ""))
    left, right = st.columns([1, 3])
    if left.button(f"Measure sensitivity ({estimate.text()})", type="primary", key="measure_sensitivity"):
        with right:
            cancel_button("sensitivity")
        progress = progress_callback("Sensitivity")
        try:
            matrix = measure_sensitivity(store, loaded, spec, actions, progress=progress)
            lr, outliers, _hit = compute_scores(store, loaded, spec, k, progress=progress)
        except (DataError, SensitivityError, RunOutOfMemory) as err:
            st.error(str(err))
            st.stop()
    else:
        st.info("Nothing heavy runs until you press **Measure sensitivity** (each action is cached per model, "
                "data, windows and seqlen once every layer is measured).")
        st.stop()
else:
    lr, outliers = scores
    st.caption("Measurements and scores loaded from the cache (same model, data, windows and seqlen).")

rows = cached_agreement(store, loaded, matrix, lr, outliers)
subtitle = f"{loaded.source}; {matrix.data_label}"
on_data = computed_on(loaded, matrix.data_label)
st.subheader("What this says")
st.markdown(sensitivity_finding(rows, matrix.actions))

show_chart(charts.sensitivity_heatmap(matrix.damages, subtitle), "sensitivity_heatmap",
           on_data + " KL and ΔNLL in nats per token over every position with a next token; colour on a log scale.",
           charts.damage_table(matrix.damages))
st.markdown("**Score → predicts which action, how well**")
st.dataframe(charts.compact_table(rows), hide_index=True)
show_chart(charts.agreement_heatmap(rows, subtitle), "sensitivity_agreement",
           on_data + " ρ between each score's predicted cost and the measured KL per layer; intervals from "
           f"{RESAMPLES} bootstrap resamples of the windows (scores held fixed).",
           charts.agreement_frame(rows))

st.subheader("Scores against measurements")
chosen = st.selectbox("Action", range(len(matrix.damages)), format_func=lambda i: matrix.damages[i].spec.label,
                      key="sens_scatter_action")
damage = matrix.damages[chosen]
by_score = {(r.score, r.action): r for r in rows}
names = score_names(rows)
distinct = [s for s in layer_scores(lr, outliers) if s.same_as is None]
for index, score in enumerate(distinct):
    if index % 2 == 0:
        columns = st.columns(2)
    with columns[index % 2]:
        slug = re.sub(r"[^a-z0-9]+", "_", score.name.lower()).strip("_")
        show_chart(charts.score_scatter(score, damage, by_score[score.name, damage.spec.key], subtitle, index),
                   f"sensitivity_{slug}_vs_{damage.spec.key}",
                   on_data + f" Scores: {names[score.name]}, {score.reading}.", charts.scatter_table(score, damage))

st.caption("Cost per action (forward-equivalents = dense forwards over the sample; the dense reference pass is "
           "shared): " + "; ".join(f"{d.spec.label} {d.forward_equivalents:.1f} in {d.seconds:.0f} s"
                                   for d in matrix.damages) + ".")
