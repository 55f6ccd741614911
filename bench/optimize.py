"""One-click optimizers on the built-in model: bits under a budget vs the orderings; solver time.

    python -m bench.optimize [--model smollm2-135m] [--budgets 3.0,3.5] [--levels 2,3,4,5,6,8] [--quantizer rtn]
                             [--candidates 5] [--held-out 8] [--granularity layer|module]
                             [--runtime research|vllm|transformers] [--part bits|slicing|groups|all] [--store FILE]
                             [--group-sizes 32,64]

Bits: for each budget (honest bits per weight, scales and zeros included),
``engine.runs.bits_optimizer.optimize_bits`` measures per-layer KL at every
level on *calibration* windows, solves, and checks its candidates plus the
uniform / LIM / ZD / random allocations at the same budget on held-out
calibration windows.  Every candidate is then run on the wiki-offline
*evaluation* windows (never used for choosing) through the dashboard's runner.
``vs_best_ordering`` = evaluation perplexity / the best of LIM, ZD, random;
``confirm_*``: the same for the chosen candidate on the ``--confirm-windows``
evaluation windows after those (out of sample for the choice of damage model).
``--granularity module`` gives each linear of each layer its level (one scan
per linear and level: 7x the measurements on Llama-like models); ``--store``
reuses measurements cached by an earlier run or the dashboard.

Solver time: 30 layers × 7 modules × 6 levels (the built-in model's module
shapes, random damages), exact k-best DP, median of 5.

Slicing (``--part slicing``): see ``engine.runs.slicing_optimizer``.

Group sizes (``--part groups``): the solver's predicted damage with one group size for the whole model against a
(level, group size) choice per unit, from the damage scans the ``--part bits`` runs cached in ``--store``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import report
from engine.core.data import DataSpec
from engine.core.models import load_model
from engine.optimize.bit_budget import GRANULARITIES, BitBudget
from engine.optimize.knapsack import solve
from engine.quant.layer_bits import describe_all
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES
from engine.runs.bits_optimizer import DEFAULT_CANDIDATES, DEFAULT_HELD_OUT, BitsOptimizerPlan, optimize_bits
from engine.runs.plans import EvalPlan, SlicingPlan
from engine.runs.runner import ensure_dense, run_quantization
from engine.runs.store import ResultsStore


def solver_seconds(repeats: int = 5) -> dict:
    """Median wall time of the exact k-best solver on 210 units × 6 levels."""
    shapes = [576 * 576, 576 * 192, 576 * 192, 576 * 576, 576 * 1536, 576 * 1536, 1536 * 576] * 30
    levels = (2, 3, 4, 5, 6, 8)
    rng = random.Random(0)
    costs = [[n * b + n // 4 for b in levels] for n in shapes]
    values = [[rng.uniform(0, 1) / b for b in levels] for _ in shapes]
    budget = int(sum(n * 3.5 for n in shapes))
    out = {}
    for k in (1, 3):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            solution = solve(costs, values, budget, k=k)
            times.append(time.perf_counter() - start)
        out[f"k={k}"] = {"seconds": statistics.median(times), "exact": solution.exact, "cells": solution.cells}
    return out


def bits_part(args, store: ResultsStore, loaded, calibration: DataSpec, evaluation: EvalPlan) -> list[dict]:
    """Every candidate on the evaluation windows; the chosen one and the orderings also on *confirmation*
    windows, the evaluation windows after those (the solver's damage model was picked after seeing the first
    ones, so these are the out-of-sample check)."""
    spec = evaluation.data
    confirmation = EvalPlan(replace(spec, offset=spec.offset + spec.n_windows, n_windows=args.confirm_windows))
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        plan = BitsOptimizerPlan(BitBudget(avg_bits=budget), levels=tuple(int(b) for b in args.levels.split(",")),
                                 quantizer=args.quantizer, group_size=args.group_size, candidates=args.candidates,
                                 held_out_windows=args.held_out, granularity=args.granularity, runtime=args.runtime)
        start = time.perf_counter()
        result = optimize_bits(store, loaded, plan, calibration)
        optimize_s = time.perf_counter() - start
        measured = []
        outcome_bytes: dict[str, float] = {}
        for i, candidate in enumerate(result.candidates):
            is_ordering = candidate.source == "ordering" or any(a.endswith("ordering") for a in candidate.also)
            ppls = []
            for windows in (evaluation, confirmation) if i == result.chosen or is_ordering else (evaluation,):
                outcome = run_quantization(store, loaded, plan.quant_plan(candidate.ordering, candidate.bits),
                                           calibration, windows, allocation=result.allocation(candidate))
                ppls.append(outcome.metrics["ppl"])
                outcome_bytes[candidate.name] = outcome.metrics["bytes_16bit"] / 1e6  # the checkpoint's, where known
            measured.append((candidate, ppls, i == result.chosen, is_ordering))
        best = [min((p[j] for _, p, _, o in measured if o), default=float("nan")) for j in (0, 1)]
        for candidate, ppls, chosen, _ in measured:
            confirm = ppls[1] if len(ppls) > 1 else None
            rows.append({"budget_bpw": budget, "quantizer": args.quantizer, "granularity": args.granularity,
                         "runtime": args.runtime, "MB": outcome_bytes.get(candidate.name),
                         "candidate": candidate.name + (f" (= {', '.join(candidate.also)})" if candidate.also else ""),
                         "chosen": chosen, "bpw": round(candidate.avg_bits, 4),
                         "predicted_damage": candidate.predicted_damage, "predicted_kl": candidate.predicted_kl,
                         "held_out_ppl": candidate.measured_ppl, "eval_ppl": ppls[0],
                         "vs_best_ordering": ppls[0] / best[0], "confirm_ppl": confirm,
                         "confirm_vs_best_ordering": None if confirm is None else confirm / best[1],
                         "bits": describe_all(candidate.bits),
                         "optimize_s": optimize_s if chosen else None})
    return rows


def groups_part(args, store: ResultsStore, loaded, calibration: DataSpec) -> list[dict]:
    """What letting the solver pick a group size per unit would be worth, predicted from the damage scans of each
    group size (cached by the ``--part bits`` runs with the same store): the summed damage the solver minimises, one
    group size for the whole model against a (level, group size) choice per unit at the same checkpoint bytes.
    Predicted only: LayerLab's allocations hold one group size per run, so the joint choice is not run."""
    from engine.optimize.bit_budget import tie_units
    from engine.optimize.unit_damage import unit_damage
    from engine.quant.runtimes import fused_groups
    from engine.runs.bits_optimizer import plan_costs
    from engine.sensitivity.cached import measure_sensitivity

    linears = list(loaded.architecture.linears)
    groups = [int(g) for g in args.group_sizes.split(",")]
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        menus = {}
        for group in groups:
            plan = BitsOptimizerPlan(BitBudget(avg_bits=budget), levels=tuple(int(b) for b in args.levels.split(",")),
                                     quantizer=args.quantizer, group_size=group, candidates=args.candidates,
                                     held_out_windows=args.held_out, granularity=args.granularity,
                                     runtime=args.runtime)
            costs = plan_costs(loaded, plan)
            damage = unit_damage(measure_sensitivity(store, loaded, calibration, plan.actions(linears)).damages,
                                 costs, plan.granularity, linears)["blended"]
            units, values = costs.units(plan.granularity), damage
            if plan.tied:
                units, values = tie_units(units, fused_groups(linears, loaded.architecture.linears), values)
            menus[group] = (costs, units, values)
        base_costs, units, _ = menus[groups[-1]]
        budget_bits = BitBudget(avg_bits=budget).layer_bits(base_costs)  # the last group size's checkpoint bytes
        for name, chosen in [(f"group {g}", [g]) for g in groups] + [("group per unit", groups)]:
            solution = solve([[c for g in chosen for c in menus[g][0].unit_bits(u)] for u in units],
                             [[v for g in chosen for v in menus[g][2][u]] for u in units], budget_bits)
            rows.append({"budget_bpw": budget, "group_size": name, "predicted_damage": solution.best.value,
                         "linears_MB": solution.best.cost / 8e6})
        single = min(r["predicted_damage"] for r in rows[-len(groups) - 1:-1])
        rows[-1]["vs_best_single"] = rows[-1]["predicted_damage"] / single
    return rows


def slicing_part(args, store: ResultsStore, loaded, calibration: DataSpec, evaluation: EvalPlan) -> list[dict]:
    """Auto schedule (SB search + measured widths, chosen on held-out calibration windows) vs the manual SB grid,
    all on evaluation windows; the grid's best is picked *on evaluation text* (an oracle the optimizer lacks)."""
    from engine.runs.runner import run_slicing
    from engine.runs.slicing_optimizer import SlicingOptimizerPlan, optimize_slicing

    plan = SlicingOptimizerPlan(target=args.target)
    start = time.perf_counter()
    result = optimize_slicing(store, loaded, plan, calibration)
    optimize_s = time.perf_counter() - start
    hidden = loaded.hidden_size
    rows = []
    for candidate in result.candidates:
        if candidate.reused:
            continue
        outcome = run_slicing(store, loaded, candidate.plan(plan.target, plan.round_to, hidden), calibration,
                              evaluation, schedule=candidate.schedule(hidden))
        rows.append({"search": "auto", "candidate": candidate.name, "chosen": candidate is result.best,
                     "achieved": outcome.metrics["achieved_fraction"], "predicted_kl": candidate.predicted_kl,
                     "held_out_ppl": candidate.measured_ppl, "eval_ppl": outcome.metrics["ppl"],
                     "slicings_to_choose": result.slicings, "seconds": optimize_s})
    for sb in [round(0.05 * i, 2) for i in range(int(round(args.target / 0.05)) + 1)]:
        outcome = run_slicing(store, loaded, SlicingPlan("dynamic", args.target, sb), calibration, evaluation)
        rows.append({"search": "manual grid", "candidate": f"LR-dynamic SB={sb:g}", "chosen": False,
                     "achieved": outcome.metrics["achieved_fraction"], "predicted_kl": None, "held_out_ppl": None,
                     "eval_ppl": outcome.metrics["ppl"], "slicings_to_choose": None, "seconds": None})
    grid = [r for r in rows if r["search"] == "manual grid"]
    best_grid = min(grid, key=lambda r: r["eval_ppl"])
    best_grid["chosen"] = True
    for row in grid:
        row["slicings_to_choose"] = len(grid)
    auto = next(r for r in rows if r["search"] == "auto" and r["chosen"])
    for row in rows:
        row["vs_best_grid"] = row["eval_ppl"] / best_grid["eval_ppl"]
    print(f"auto {auto['candidate']}: {auto['eval_ppl']:.2f} vs best grid {best_grid['candidate']}: "
          f"{best_grid['eval_ppl']:.2f} ({result.slicings} vs {len(grid)} slicings)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["bits", "slicing", "groups", "all"], default="all")
    parser.add_argument("--budgets", default="3.0,3.5")
    parser.add_argument("--levels", default="2,3,4,5,6,8")
    parser.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn")
    parser.add_argument("--granularity", choices=GRANULARITIES, default="layer")
    parser.add_argument("--runtime", choices=list(RUNTIMES), default=DEFAULT_RUNTIME,
                        help="target runtime: its levels and grid (vllm: 4/8 bits, a zero point per group, q/k/v and "
                        "gate/up tied)")
    parser.add_argument("--model", default="smollm2-135m", help="a built-in model or a local folder")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--group-sizes", default="32,64",
                        help="--part groups: group sizes whose damage scans the store holds (budget bytes: the last)")
    parser.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES)
    parser.add_argument("--held-out", type=int, default=DEFAULT_HELD_OUT, help="held-out calibration windows")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--confirm-windows", type=int, default=32,
                        help="evaluation windows after --eval-windows, for the chosen candidate and the orderings")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--target", type=float, default=0.25, help="slicing target SP (--part slicing)")
    parser.add_argument("--store", default=None, help="results store to reuse (default: a throw-away one)")
    args = parser.parse_args()
    loaded = load_model(args.model)
    store = ResultsStore(Path(args.store) if args.store else
                         Path(tempfile.mkdtemp(prefix="bench-optimize-")) / "runs.sqlite")
    calibration = DataSpec("wiki-offline", "calibration", args.seqlen, args.calib_windows)
    evaluation = EvalPlan(DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows))
    dense = ensure_dense(store, loaded, evaluation)
    meta = {"model": loaded.source, "dense_ppl": round(dense.metrics["ppl"], 3), "evaluation": dense.data_label,
            "calibration": calibration.label()}
    if args.part in ("bits", "all"):
        meta["solver"] = solver_seconds()
        suffix = ("" if args.granularity == "layer" else f"_{args.granularity}") + (
            "" if args.runtime == DEFAULT_RUNTIME else f"_{args.runtime}") + (
            "" if args.group_size == 128 else f"_g{args.group_size}") + (
            "" if args.model == "smollm2-135m" else f"_{Path(args.model).name}")
        report(f"optimize_bits_{args.quantizer}{suffix}", bits_part(args, store, loaded, calibration, evaluation), meta)
    if args.part == "groups":
        report(f"optimize_groups_{args.quantizer}_{args.runtime}", groups_part(args, store, loaded, calibration), meta)
    if args.part in ("slicing", "all"):
        report("optimize_slicing", slicing_part(args, store, loaded, calibration, evaluation), meta)


if __name__ == "__main__":
    main()
