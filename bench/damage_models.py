"""Which per-unit damage should the bits solver sum?  Six candidates, measured on held-out and evaluation text.

    python -m bench.damage_models --store S [--granularity layer|module] [--levels 2,3,4,5,6,8]
                                  [--budgets 3.0,3.5] [--k 3]

The sensitivity scans (KL and ΔNLL of quantizing each unit alone at each
level, RTN g128, 8 × 256 calibration windows) must already be in the store
``S``: run ``bench.optimize --part bits --calib-windows 8 --store S`` first
(with ``--granularity module --levels 2,3,4,5`` for the per-linear scans).
For each damage model the exact solver's ``k`` best allocations at
each budget are quantized and measured on 24 held-out calibration windows
(``ho8``: the first 8, what the optimizer checks on by default) and on the 16
evaluation windows ``bench.optimize`` reports; LIM and ZD alongside.

Damage models (per unit and level, nats/token; ``mono``: never below zero,
never less at fewer bits, :func:`engine.optimize.damage.monotone_in_bits`):
``kl``; ``dnll``; ``dnll_mono``; ``ucb_mono`` = mono(ΔNLL + 1 SE over windows);
``max_kl_dnll`` = mono(max(KL, ΔNLL)); ``blend`` = mono(mean(KL, ΔNLL + 1 SE)),
which is :func:`engine.optimize.damage.blended`, what the optimizer uses.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.evaluation.perplexity import window_nll_sums
from engine.optimize.bit_budget import BitBudget
from engine.optimize.damage import blended, monotone_in_bits, upper_dnll
from engine.optimize.knapsack import solve
from engine.optimize.unit_damage import allocation_from_units, unit_scans
from engine.quant.layer_bits import describe_all
from engine.quant.quantize_model import quantize_model
from engine.runs.bits_competitors import competitors
from engine.runs.bits_optimizer import BitsOptimizerPlan, held_out_spec, plan_costs
from engine.runs.store import ResultsStore
from engine.sensitivity.cached import sensitivity_if_cached


def damage_models(kl: list[float], dnll: list[float], windows: list[list[float]]) -> dict[str, list[float]]:
    """One unit's damage at each level under every model compared (levels ascending)."""
    return {"kl": kl, "dnll": dnll, "dnll_mono": monotone_in_bits(dnll), "ucb_mono": upper_dnll(dnll, windows),
            "max_kl_dnll": monotone_in_bits([max(a, b) for a, b in zip(kl, dnll)]),
            "blend": blended(kl, dnll, windows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True, help="results store holding the scans")
    parser.add_argument("--granularity", choices=["layer", "module"], default="layer")
    parser.add_argument("--levels", default=None, help="default: 2,3,4,5,6,8 per layer, 2,3,4,5 per linear")
    parser.add_argument("--budgets", default="3.0,3.5")
    parser.add_argument("--k", type=int, default=3, help="solver candidates per damage model")
    args = parser.parse_args()
    levels = tuple(int(b) for b in (args.levels or ("2,3,4,5,6,8" if args.granularity == "layer"
                                                     else "2,3,4,5")).split(","))
    loaded = load_model("smollm2-135m")
    store = ResultsStore(Path(args.store))
    calibration = DataSpec("wiki-offline", "calibration", 256, 8)
    held = token_windows(held_out_spec(calibration, 24), loaded.tokenizer, loaded.max_seqlen)
    evaluation = token_windows(DataSpec("wiki-offline", "evaluation", 256, 16), loaded.tokenizer, loaded.max_seqlen)

    def window_nll(model: torch.nn.Module, windows) -> torch.Tensor:
        return window_nll_sums(model, windows).double() / (windows.seqlen - 1)  # [n_windows] nats/token

    dense_held, dense_eval = window_nll(loaded.model, held), window_nll(loaded.model, evaluation)
    linears = list(loaded.architecture.linears)
    measured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        plan = BitsOptimizerPlan(BitBudget(avg_bits=budget), levels=levels, granularity=args.granularity)
        matrix = sensitivity_if_cached(store, loaded, calibration, plan.actions(linears))
        if matrix is None:
            raise SystemExit("The scans are not in this store: run bench.optimize with the same --store first.")
        costs = plan_costs(loaded, plan)  # the optimizer's own sizes
        units = costs.units(args.granularity)
        per_unit = {(layer, name): damage_models([d.kl[layer] for d in columns], [d.delta_nll[layer] for d in columns],
                                                 [d.window_delta_nll[layer] for d in columns])
                    for (layer, name), columns in unit_scans(matrix.damages, costs, args.granularity, linears).items()}
        budget_bits = plan.budget.layer_bits(costs)
        proposals = {}
        for model in per_unit[units[0]]:
            solution = solve([costs.unit_bits(u) for u in units], [per_unit[u][model] for u in units], budget_bits,
                             k=args.k)
            for n, selection in enumerate(solution.selections, 1):
                proposals[f"{model} #{n}"] = allocation_from_units(units, [levels[j] for j in selection.choice],
                                                                   loaded.num_layers)
        rivals = competitors(store, loaded, calibration, costs, budget_bits, None)
        proposals.update({"LIM": rivals["LIM ordering"], "ZD": rivals["ZD ordering"]})
        for name, bits in proposals.items():
            key = describe_all(bits)
            if key not in measured:
                quantized = quantize_model(loaded, bits, None, spec=plan.spec())
                measured[key] = (window_nll(quantized.model, held) - dense_held,
                                 window_nll(quantized.model, evaluation) - dense_eval)
                del quantized
            held_delta, eval_delta = measured[key]
            rows.append({"granularity": args.granularity, "budget_bpw": budget, "candidate": name,
                         "bpw": round(costs.avg_bits(bits), 4),
                         "ho8_ppl": math.exp(float((dense_held[:8] + held_delta[:8]).mean())),
                         "ho24_ppl": math.exp(float((dense_held + held_delta).mean())),
                         "eval_ppl": math.exp(float((dense_eval + eval_delta).mean())), "bits": key})
            print(f"{budget} {name:16} ho8 {rows[-1]['ho8_ppl']:9.1f} eval {rows[-1]['eval_ppl']:9.1f}", flush=True)
    report(f"damage_models_{args.granularity}", rows, {"model": loaded.source, "calibration": calibration.label(),
                                                        "held_out": held.label(), "evaluation": evaluation.label()})


if __name__ == "__main__":
    main()
