"""The one-click optimizer sections of the Quantization and Slicing pages (widgets only; the engine decides)."""

from __future__ import annotations

import streamlit as st

from engine.core.data import DataError, DataSpec
from engine.core.models import LoadedModel
from engine.optimize.bit_budget import DEFAULT_LEVELS, BitBudget
from engine.quant.grid import LLAMACPP, MAX_BITS, MIN_BITS
from engine.quant.layer_bits import is_per_module
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES, fused_groups
from engine.runs.bits_optimizer import (
    DEFAULT_CANDIDATES,
    DEFAULT_HELD_OUT,
    BitsOptimizerPlan,
    cheaper_settings,
    check_plan,
    optimization_if_cached,
    optimize_bits,
    optimize_estimate,
)
from engine.runs.plans import EvalPlan
from engine.runs.runner import run_estimate, run_quantization
from engine.viz import charts
from engine.viz.optimizer_charts import candidates_chart
from ui.state import kept
from ui.widgets import cancel_button, progress_callback, show_chart, show_outcome


def default_avg_bits(levels: list[int]) -> float:
    """The budget the page starts at: 3.5 bits per weight where the levels reach below it, else halfway between
    the lowest and the highest level (vLLM's 4 and 8: 6), so the first view is a budget the levels can meet."""
    low, high = min(levels), max(levels)
    return 3.5 if low < 3.5 else round((low + high) / 2 * 8) / 8


def bits_optimizer_panel(store, loaded: LoadedModel, calibration: DataSpec, evaluation: EvalPlan, quantizer: str,
                         group_size: int, level_options: list[int] | None = None, imatrix: bool = False,
                         output_type: str = "auto", runtime: str = DEFAULT_RUNTIME) -> None:
    """Budget, levels, candidates → Optimize (measure, solve, check on held-out) → run on evaluation text."""
    st.subheader("Optimize for budget")
    st.caption("Finds the bits for each layer (or each linear) that lose the least quality within a size "
               "budget, from measured damage, and checks its picks against the usual orderings on held-out text.")
    with st.expander("How it works"):
        st.markdown(
            "1. **Measure**: the Sensitivity lab's KL and ΔNLL of quantizing each layer (or linear) alone at each "
            "level, on calibration text, blended into one damage (the mean of KL and ΔNLL plus one standard "
            "error, never less at fewer bits, so a unit whose ΔNLL reads zero by chance is not free).\n"
            "2. **Solve**: an exact solver finds the allocations of least summed damage within the budget.\n"
            "3. **Check**: the solver's best candidates, the uniform allocation and the LIM / ZD / random "
            "orderings at the same budget (with llama.cpp's types also the llama.cpp presets that fit) are "
            "measured on held-out calibration windows; the best measured one is chosen, so the optimizer is "
            "never worse than what it competes with there.\n\n" + (
                "Sizes are the GGUF file's bytes; llama.cpp's own types and quantizer (the levels name their "
                "types)." if quantizer == LLAMACPP else
                f"Sizes are honest (scales and zeros included); {quantizer.upper()} with groups of {group_size}."))
    cols = st.columns(4)
    kind = cols[0].radio("Budget as", ["bits", "MiB"], key=kept("opt_budget_kind"), horizontal=True,
                         format_func={"bits": "bits per weight", "MiB": "model MiB"}.get)
    options = level_options or list(range(MIN_BITS, MAX_BITS + 1))
    per_runtime = "" if runtime == DEFAULT_RUNTIME else f"_{runtime}"  # each runtime keeps its own choices
    if kind == "bits":
        budget = BitBudget(avg_bits=cols[0].number_input("Average bits per weight", 2.0, 8.5, default_avg_bits(options),
                                                         0.125, key=kept("opt_avg_bits" + per_runtime)))
    else:
        budget = BitBudget(total_bytes=cols[0].number_input("Model size (MiB)", 1.0, 1e6, 100.0, 1.0,
                                                            key=kept("opt_mib")) * 2**20)
    levels_key = "opt_levels_llamacpp" if quantizer == LLAMACPP else "opt_levels" + per_runtime
    levels = cols[1].multiselect("Allowed levels", options, [b for b in DEFAULT_LEVELS if b in options],
                                 key=kept(levels_key))
    candidates = cols[2].slider("Solver candidates", 1, 8, DEFAULT_CANDIDATES, key=kept("opt_candidates"),
                                help="Damage does not add up exactly: the best few allocations by the sum are "
                                "measured, not only the first.")
    held_out = cols[3].number_input("Held-out windows", 1, 32, DEFAULT_HELD_OUT, key=kept("opt_held_out"),
                                    help="Calibration windows right after the ones measured on.")
    linears = list(loaded.architecture.linears)
    tied = fused_groups(linears, loaded.architecture.linears) if RUNTIMES[runtime].fused else []
    granularity = st.radio(
        "A level for each", ["layer", "module"], key=kept("opt_granularity"), horizontal=True,
        format_func={"layer": "layer (all its linears)", "module": f"linear ({', '.join(linears)})"}.get,
        help=f"Per linear, each of the {len(linears)} linears of every layer gets its own level: one damage scan "
        f"per linear and level ({len(linears)}× the measurements), a finer choice under the same budget. On the "
        "built-in model at 3.5 bits per weight it beat the best ordering by 12% on evaluation text, a level per "
        "layer by 5% (docs/benchmarks.md, bench/optimize.py)." + (
            f" For {RUNTIMES[runtime].label}, {' and '.join('/'.join(g) for g in tied)} share one level each (the "
            "runtime loads them as one module)." if tied else ""))
    try:
        plan = BitsOptimizerPlan(budget, tuple(levels), quantizer, group_size, candidates, int(held_out),
                                 granularity, imatrix, output_type, runtime)
        check_plan(loaded, plan)
        result = optimization_if_cached(store, loaded, plan, calibration)
        estimate = optimize_estimate(store, loaded, plan, calibration) if result is None else ""
    except (DataError, ValueError) as err:
        st.error(str(err))
        return
    if result is None:
        if (hint := cheaper_settings(store, loaded, plan, calibration)) is not None:
            st.info(hint)
        left, right = st.columns(2)
        if left.button(f"Optimize for budget ({estimate} + checking candidates)", type="primary", key="optimize_bits"):
            with right:
                cancel_button("optimize_bits")
            try:
                result = optimize_bits(store, loaded, plan, calibration, progress=progress_callback("Optimizing"))
            except (DataError, ValueError) as err:
                st.error(str(err))
                return
    if result is None:
        return
    st.markdown(result.summary())
    table = result.table()
    subtitle = f"{loaded.source}; damages from {result.measured_on}; checked on {result.held_out_on}"
    show_chart(candidates_chart(table, subtitle), "optimizer_candidates",
               f"Budget {plan.budget.label()}: {len(table)} candidates; the solver was "
               f"{'exact' if result.exact else 'near-exact (costs rounded up)'} and took "
               f"{result.solve_seconds * 1000:.0f} ms. {subtitle}.", table)
    st.dataframe(table, hide_index=True, width="stretch")
    subtitle = f"{loaded.source}; {result.best.name}, budget {plan.budget.label()}"
    if plan.granularity == "module" or is_per_module(result.best.bits):
        bits = charts.module_bit_map_table(result.best.bits, linears)
        figure = charts.module_bit_map_chart(bits, subtitle)
    else:
        bits = charts.bit_map_table(result.best.bits, None, "")
        figure = charts.bit_map_chart(bits, subtitle)
    show_chart(figure, "optimizer_bit_map", f"The chosen allocation: {result.best.avg_bits:.3f} bits per weight "
               f"({result.best.model_bytes / 2**20:.1f} MiB "
               f"{'as a GGUF file' if quantizer == LLAMACPP else 'with unquantized parts at 16 bits'}).", bits)
    runs = result.comparison_runs()
    cost = run_estimate(loaded, plan.quant_plan(), calibration, evaluation, store)
    if st.button(f"Run the optimizer's allocation and the {len(runs) - 1} orderings on evaluation text "
                 f"(≈ {len(runs)} × {cost})", key="run_optimizer_allocation"):
        progress = progress_callback("Evaluating")
        try:
            shown = False
            for ordering, candidate in runs:
                outcome = run_quantization(store, loaded, plan.quant_plan(ordering, candidate.bits), calibration,
                                           evaluation, allocation=result.allocation(candidate), progress=progress)
                if candidate is result.best and not shown:
                    shown = True
                    st.caption(f"The chosen allocation ({result.best.name}), on evaluation text:")
                    show_outcome(outcome, loaded)
        except (DataError, ValueError) as err:
            st.error(str(err))
        else:
            st.success("Stored: the trade-off chart below shows them at equal average bits.")


def slicing_optimizer_panel(store, loaded: LoadedModel, calibration: DataSpec, evaluation: EvalPlan, target: float,
                            round_to: int) -> None:
    """Target, measured fractions → Find best schedule (measure, predict, check on held-out) → run on evaluation."""
    import pandas as pd

    from engine.optimize.slicing_budget import check_reachable
    from engine.runs.runner import run_slicing
    from engine.runs.slicing_optimizer import (
        SlicingOptimizerPlan,
        optimize_slicing,
        slicing_optimization_if_cached,
        slicing_optimize_estimate,
    )
    from engine.slicing.slice_model import pca_rank_warning
    from engine.viz.optimizer_charts import basis_search_chart

    st.subheader("Find best schedule")
    st.caption(
        "Measures what slicing each layer alone costs (KL on calibration text, at a few fractions), predicts every "
        "LR-dynamic SB from those curves without slicing, builds a measured schedule (per-layer widths by an exact "
        "solver under the average), then slices only the best predicted SB values, the low end of the SB range "
        "(the prediction ranks SB poorly) and the measured schedule, and checks them on held-out calibration "
        "windows. Schedules with the same widths are sliced once.")
    rank_warning = pca_rank_warning((calibration.n_windows or 10**9) * calibration.seqlen, loaded.hidden_size)
    if rank_warning:
        st.warning(rank_warning + " On the calibration text itself the measured damage is then near 0 (the "
                   "dimensions sliced away carry none of its variance), so the search has nothing to go on, while "
                   "other text loses much more.")
    cols = st.columns(3)
    fractions = cols[0].multiselect("Fractions measured per layer", [0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5],
                                    [0.1, 0.2, 0.3, 0.4], key=kept("opt_slice_fractions"))
    checks = cols[1].slider("Best predicted SB values sliced and checked", 1, 4, 1, key=kept("opt_slice_checks"),
                            help="Besides these, the low end of the SB range (SB = 0, pure LR-dynamic) and the "
                                 "measured schedule are always checked: the additive prediction ranks SB poorly.")
    held_out = cols[2].number_input("Held-out windows", 1, 32, DEFAULT_HELD_OUT, key=kept("opt_slice_held_out"))
    try:
        plan = SlicingOptimizerPlan(target, tuple(sorted(fractions)), int(round_to), int(held_out), checks)
        if not fractions:
            raise ValueError("Choose at least one fraction to measure (e.g. 0.1, 0.2, 0.3, 0.4).")
        check_reachable(target, fractions, loaded.hidden_size, loaded.num_layers, int(round_to))
        plan.actions()
        result = slicing_optimization_if_cached(store, loaded, plan, calibration)
        estimate = slicing_optimize_estimate(store, loaded, plan, calibration) if result is None else ""
    except (DataError, ValueError) as err:
        st.error(str(err))
        return
    if result is None:
        left, right = st.columns(2)
        if left.button(f"Find best schedule ({estimate} + {checks + 2} slicings at most)", type="primary",
                       key="optimize_slicing"):
            with right:
                cancel_button("optimize_slicing")
            try:
                result = optimize_slicing(store, loaded, plan, calibration,
                                          progress=progress_callback("Finding the schedule"))
            except (DataError, ValueError) as err:
                st.error(str(err))
                return
    if result is None:
        return
    st.markdown(result.summary())
    table = result.table()
    subtitle = f"{loaded.source}; damages from {result.measured_on}; checked on {result.held_out_on}"
    show_chart(basis_search_chart(pd.DataFrame(result.grid), table[table["SB"].notna()], subtitle),
               "slicing_basis_search", f"Target SP {target:.0%}; {result.slicings} slicings. {subtitle}.",
               pd.DataFrame(result.grid))
    st.dataframe(table, hide_index=True, width="stretch")
    hidden = loaded.hidden_size
    best = result.best
    widths = charts.schedule_table(best.schedule(hidden).fractions, best.dims, hidden, None)
    show_chart(charts.schedule_chart(widths, f"{loaded.source}; {best.name}"), "optimizer_schedule",
               f"The chosen schedule: {best.name}, average {best.fraction:.3f} removed.", widths)
    cost = run_estimate(loaded, best.plan(target, int(round_to), hidden), calibration, evaluation, store)
    if st.button(f"Run the chosen schedule on evaluation text ({cost})", key="run_chosen_schedule"):
        try:
            outcome = run_slicing(store, loaded, best.plan(target, int(round_to), hidden), calibration, evaluation,
                                  schedule=best.schedule(hidden), progress=progress_callback("Slicing"))
        except (DataError, ValueError) as err:
            st.error(str(err))
        else:
            show_outcome(outcome, loaded)
