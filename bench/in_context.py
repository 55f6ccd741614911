"""Does damage measured *in context* choose better bits than the optimizer's damage measured alone?

    python -m bench.in_context [--model smollm2-135m] [--runtime vllm] [--levels 4,8] [--group-size 64]
                               [--budgets 4.5,6] [--calib-windows 4] [--held-out 4] [--eval-windows 16]
                               [--confirm-windows 16] [--store FILE]

The bits optimizer (:mod:`engine.runs.bits_optimizer`) sums each unit's damage measured with that unit
quantized *alone* (the rest of the model dense).  Damage is not additive, so this bench measures a second
model of it: start from a *base* allocation (every unit at the lowest level, and the optimizer's chosen
allocation), change one unit at a time to each other level with everything else at the base, measure the
change of the mean of KL and ΔNLL to dense on the same calibration windows (nats/token), and solve the same
knapsack with those changes.  Every candidate is evaluated on the evaluation windows and the confirmation
windows after them, as ``bench.optimize`` does, beside the optimizer's choice and the LIM ordering.

One quantized model and one evaluation of the calibration windows per unit and level: 120 evaluations on
SmolLM2 under vLLM (30 layers × 4 fused units), about 10 min per base here.  Granularity is per linear
(fused groups tied where the runtime fuses them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.evaluation.divergence import DenseReference, DivergenceMeter
from engine.evaluation.perplexity import perplexity
from engine.optimize.bit_budget import TIE, BitBudget, tie_units
from engine.optimize.damage import monotone_in_bits
from engine.optimize.knapsack import solve
from engine.optimize.unit_damage import allocation_from_units
from engine.quant.layer_bits import LayerBits, describe_all
from engine.quant.quantize_model import quantize_model
from engine.quant.runtimes import fused_groups, runtime_named
from engine.runs.bits_optimizer import BitsOptimizerPlan, optimize_bits, plan_costs
from engine.runs.store import ResultsStore


def unit_level(bits: list[LayerBits], unit: tuple[int, str]) -> int:
    """The level of ``unit`` (``(layer, "q+k+v")``) in an allocation (a tied unit: its first linear's)."""
    entry = bits[unit[0]]
    return entry if isinstance(entry, int) else entry[unit[1].split(TIE)[0]]


def in_context_values(loaded, spec, units, levels, base, calibration) -> tuple[list[list[float]], float]:
    """Per unit and level: the change of (KL + ΔNLL) / 2 to dense when only that unit moves from its base level
    (0 at the base level), made monotone in bits; and the base's own damage (nats/token)."""
    windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    reference = DenseReference.empty(windows.n_windows * (windows.seqlen - 1))
    dense = perplexity(loaded.model, windows, observer=reference.observe)

    def damage(per_unit: list[int]) -> float:
        model = quantize_model(loaded, allocation_from_units(units, per_unit, loaded.num_layers), spec=spec).model
        meter = DivergenceMeter(reference)
        nll = perplexity(model, windows, observer=meter.observe).mean_nll
        return (meter.result().mean + nll - dense.mean_nll) / 2

    at_base = damage(base)
    values = []
    for n in range(len(units)):
        row = [0.0 if level == base[n] else damage(base[:n] + [level] + base[n + 1:]) - at_base for level in levels]
        row = monotone_in_bits([v - min(row) for v in row])  # shifted to ≥ 0: the solver's values
        values.append(row)
    return values, at_base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runtime", default="vllm")
    parser.add_argument("--levels", default="4,8")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--budgets", default="4.5,6")
    parser.add_argument("--calib-windows", type=int, default=4)
    parser.add_argument("--held-out", type=int, default=4)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--confirm-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--store", default=None, help="results store with the optimizer's scans (else a new one)")
    args = parser.parse_args()

    loaded = load_model(args.model)
    store = ResultsStore(Path(args.store) if args.store else
                         Path(tempfile.mkdtemp(prefix="bench-in-context-")) / "runs.sqlite")
    calibration = DataSpec("wiki-offline", "calibration", args.seqlen, args.calib_windows)
    evaluation = DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows)
    confirmation = replace(evaluation, offset=args.eval_windows, n_windows=args.confirm_windows)
    texts = {name: token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
             for name, spec in (("eval", evaluation), ("confirm", confirmation))}
    linears = list(loaded.architecture.linears)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        plan = BitsOptimizerPlan(BitBudget(avg_bits=budget), levels=tuple(int(b) for b in args.levels.split(",")),
                                 group_size=args.group_size, granularity="module", runtime=args.runtime,
                                 held_out_windows=args.held_out, candidates=args.candidates)
        spec, costs = plan.spec(), plan_costs(loaded, plan)
        result = optimize_bits(store, loaded, plan, calibration)
        units = costs.units("module")
        if runtime_named(args.runtime).fused:
            units, _ = tie_units(units, fused_groups(linears, loaded.architecture.linears), {u: [] for u in units})
        budget_bits = plan.budget.layer_bits(costs)

        def row(name: str, bits: list[LayerBits], **extra) -> dict:
            ppl = {k: perplexity(quantize_model(loaded, bits, spec=spec).model, w).ppl for k, w in texts.items()}
            return {"budget_bpw": budget, "candidate": name, "bpw": round(costs.avg_bits(bits), 4), **extra,
                    "eval_ppl": ppl["eval"], "confirm_ppl": ppl["confirm"], "bits": describe_all(bits)}

        best_ordering = min((c for c in result.candidates if c.source == "ordering"), key=lambda c: c.measured_ppl)
        alone = row(f"optimizer (damage alone), {result.best.name}", result.best.bits)
        rows += [alone, row(f"{best_ordering.name} (best on held-out)", best_ordering.bits)]
        bases = {"lowest level": [costs.levels[0]] * len(units),
                 "optimizer's choice": [unit_level(result.best.bits, u) for u in units]}
        for base_name, base in bases.items():
            start = time.perf_counter()
            values, at_base = in_context_values(loaded, spec, units, costs.levels, base, calibration)
            seconds = time.perf_counter() - start
            solution = solve([costs.unit_bits(u) for u in units], values, budget_bits, k=args.candidates)
            for n, selection in enumerate(solution.selections, 1):
                bits = allocation_from_units(units, [costs.levels[j] for j in selection.choice], loaded.num_layers)
                rows.append(row(f"in context of {base_name} #{n}", bits, base_damage=at_base, measure_s=seconds))
        for r in rows:
            if r["budget_bpw"] == budget:
                r["vs_optimizer"] = r["eval_ppl"] / alone["eval_ppl"]
    report(f"in_context_{args.runtime}_g{args.group_size}", rows,
           {"model": loaded.source, "calibration": calibration.label(), "evaluation": evaluation.label(),
            "confirmation": confirmation.label()})


if __name__ == "__main__":
    main()
