"""'Optimize for budget' on the tiny model: budgets respected, held-out text only, never worse than competitors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

import engine.runs.bits_optimizer as bits_optimizer
from engine.cli import main
from engine.core.data import DataSpec
from engine.optimize.bit_budget import BitBudget, BudgetError, check_levels, layer_costs
from engine.quant.grid import QuantizerSpec
from engine.runs.bits_optimizer import BitsOptimizerPlan, held_out_spec, optimization_if_cached, optimize_bits
from engine.runs.plans import EvalPlan
from engine.runs.runner import run_quantization
from engine.runs.store import ResultsStore

CALIB = DataSpec("wiki-offline", "calibration", 32, 4)
PLAN = BitsOptimizerPlan(BitBudget(avg_bits=3.5), levels=(2, 3, 4, 8), candidates=2, held_out_windows=2)


def test_costs_are_honest_bits_and_budgets_outside_the_levels_are_refused(tiny_loaded):
    spec = QuantizerSpec(group_size=32)
    costs = layer_costs(tiny_loaded.model, tiny_loaded.architecture, (2, 4), spec)
    # 4-bit codes + fp16 scale and zero per 32 columns = 4 + 32/32 = 5 bits per weight in every layer
    assert costs.avg_bits([4] * 4) == pytest.approx(5.0)
    assert costs.avg_bits([2, 4, 4, 2]) == pytest.approx(4.0)
    with pytest.raises(BudgetError, match=r"below the smallest .* choose 3\.000–5\.000 bits per weight"):
        BitBudget(avg_bits=2.5).layer_bits(costs)
    with pytest.raises(BudgetError, match="above the largest"):
        BitBudget(avg_bits=9).layer_bits(costs)
    with pytest.raises(BudgetError, match="MiB"):
        BitBudget(total_bytes=10).layer_bits(costs)
    with pytest.raises(BudgetError, match="at least one bit level"):
        check_levels([])
    with pytest.raises(BudgetError, match="out of range"):
        check_levels([1, 4])
    with pytest.raises(BudgetError, match="one of them"):
        BitBudget()


def test_held_out_windows_follow_the_measured_ones():
    held = held_out_spec(CALIB, 3)
    assert (held.split, held.offset, held.n_windows) == ("calibration", 4, 3)
    assert held.label().endswith("from window 4")
    with pytest.raises(ValueError, match="instead of 'all'"):
        held_out_spec(replace(CALIB, n_windows=None), 2)


def test_optimizer_respects_the_budget_reads_no_evaluation_text_and_returns_the_best_measured(store, tiny_loaded,
                                                                                            monkeypatch):
    seen = []
    real = bits_optimizer.token_windows

    def spy(spec, *args, **kwargs):
        seen.append(spec)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(bits_optimizer, "token_windows", spy)
    result = optimize_bits(store, tiny_loaded, PLAN, CALIB)
    assert seen and all(spec.split == "calibration" for spec in seen)
    names = [c.name for c in result.candidates] + [a for c in result.candidates for a in c.also]
    assert {"optimizer #1", "uniform", "LIM ordering", "ZD ordering", "random ordering"} <= set(names)
    for candidate in result.candidates:
        assert candidate.avg_bits <= 3.5 + 1e-12 and set(candidate.bits) <= {2, 3, 4, 8}
    best = min(c.measured_ppl for c in result.candidates)
    assert result.best.measured_ppl == best  # never worse than a competitor on the held-out windows
    assert all(math.isfinite(c.measured_kld) for c in result.candidates)  # also measured, not what chooses here
    solver = [c for c in result.candidates if c.source == "optimizer"]
    # the solver's first pick has the least summed damage (what it minimises) of every candidate
    assert solver[0].predicted_damage <= min(c.predicted_damage for c in result.candidates) + 1e-12
    assert "Chosen:" in result.summary() and "from window 4" in result.summary()
    again = optimization_if_cached(store, tiny_loaded, PLAN, CALIB)
    assert again is not None and again.to_dict() == result.to_dict()


def test_in_llamacpp_types_the_held_out_kl_divergence_chooses(store, tiny_loaded):
    """llama.cpp's users compare files by KL divergence to the unquantized model: with its types the optimizer
    measures both on the held-out windows and returns the lowest KL divergence (research grid: perplexity).
    With an imatrix, every candidate is quantized with the calibration text's importance (as the run will be)."""
    plan = BitsOptimizerPlan(BitBudget(avg_bits=5.0), levels=(2, 4, 8), quantizer="llama.cpp", candidates=2,
                             held_out_windows=2, imatrix=True)  # candidates quantized with the calibration imatrix
    assert plan.judged_by == "kld" and PLAN.judged_by == "ppl"
    result = optimize_bits(store, tiny_loaded, plan, CALIB)
    klds = [c.measured_kld for c in result.candidates]
    # measured and different between candidates (on this random model all are near 0: its distributions are
    # nearly flat, and the bounded reference's tail estimate can read a hair below it)
    assert all(math.isfinite(k) for k in klds) and len(set(klds)) > 1
    assert result.best.measured_kld == min(klds)
    assert "KL divergence to dense" in result.summary() and "held-out KLD" in result.table()
    # the solver minimizes what the choice is judged by: summed KL, not the perplexity-leaning blend
    solver = [c for c in result.candidates if c.source == "optimizer"]
    predicted = [c.predicted_kl for c in result.candidates if math.isfinite(c.predicted_kl)]
    assert min(c.predicted_kl for c in solver) <= min(predicted) + 1e-12


@pytest.mark.slow  # the engine path is covered in the fast tier; this adds the CLI wiring
def test_cli_optimize_bits_prints_stores_and_writes_json(tiny_folder, tmp_path, capsys):
    out = tmp_path / "bits.json"
    argv = ["optimize-bits", "--model", tiny_folder, "--store", str(tmp_path / "r.sqlite"), "--avg-bits", "3.5",
            "--levels", "2,3,4,8", "--candidates", "2", "--held-out", "2", "--calib-windows", "4",
            "--calib-seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32", "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert '"summary"' in printed and '"kind": "quantization"' in printed
    written = json.loads(out.read_text())
    assert written["candidates"] and written["eval_ppl"] > 1
    run = ResultsStore(tmp_path / "r.sqlite").get_run(written["run"])
    assert run.series.startswith("optimizer") and run.metrics["bits_per_weight"] <= 3.5 + 1e-9
    assert main([*argv[:5], "--avg-bits", "1.0", *argv[7:]]) == 2
    assert "below the smallest" in capsys.readouterr().err


def test_module_granularity_gives_each_linear_a_level_within_the_budget(store, tiny_loaded):
    plan = replace(PLAN, levels=(2, 4), granularity="module", candidates=3)
    linears = list(tiny_loaded.architecture.linears)
    assert [(a.bits, a.module) for a in plan.actions(linears)][:2] == [(2, linears[0]), (2, linears[1])]
    assert len(plan.actions(linears)) == 2 * len(linears)
    result = optimize_bits(store, tiny_loaded, plan, CALIB)
    costs = layer_costs(tiny_loaded.model, tiny_loaded.architecture, plan.levels, plan.spec())
    budget = 3.5 * costs.total_weights
    solver = [c for c in result.candidates if c.source == "optimizer"]
    assert solver and any(isinstance(entry, dict) for c in solver for entry in c.bits)  # levels per linear
    for candidate in result.candidates:
        assert costs.total_bits(candidate.bits) <= budget and candidate.avg_bits <= 3.5 + 1e-12
    # the solver's first pick has the least predicted damage of every candidate (orderings summed per linear)
    assert solver[0].predicted_damage <= min(c.predicted_damage for c in result.candidates) + 1e-12
    assert result.best.measured_ppl == min(c.measured_ppl for c in result.candidates)
    # stored per linear, run like any allocation, under its own series
    again = optimization_if_cached(store, tiny_loaded, plan, CALIB)
    assert again is not None and again.to_dict() == result.to_dict()
    assert optimization_if_cached(store, tiny_loaded, replace(plan, granularity="layer"), CALIB) is None
    with pytest.raises(BudgetError, match="granularity"):
        replace(plan, granularity="tensor")
    # the chosen solver allocation runs and is stored like any other, sized per linear
    chosen = next(c for c in solver if any(isinstance(entry, dict) for entry in c.bits))
    evaluation = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))
    outcome = run_quantization(store, tiny_loaded, plan.quant_plan("optimizer"), CALIB, evaluation,
                               allocation=result.allocation(chosen))
    assert outcome.record.series.startswith("optimizer per linear")
    assert outcome.metrics["bits_per_weight"] == pytest.approx(chosen.avg_bits)
    assert outcome.record.config["bits"] == chosen.bits and outcome.record.config["low_fraction"] is None


def test_for_vllm_the_per_linear_optimizer_ties_fused_linears_and_uses_its_levels_only(store, tiny_loaded):
    plan = BitsOptimizerPlan(BitBudget(avg_bits=6.0), levels=(4, 8), group_size=32, candidates=3, held_out_windows=2,
                             granularity="module", runtime="vllm")
    assert plan.tied and plan.zero_point == "integer" and plan.spec().zero_point_at(4) == "integer"  # vLLM's uint4
    # each level measured on the grid it runs on: 4 bits with zero points (the default grid), 8 bits symmetric
    assert {(a.bits, a.zero_point) for a in plan.actions(list(tiny_loaded.architecture.linears))} == {
        (4, None), (8, "symmetric")}
    for_transformers = replace(plan, runtime="transformers")
    assert for_transformers.spec().zero_point == "symmetric"
    assert all(a.zero_point == "symmetric" for a in for_transformers.actions(list(tiny_loaded.architecture.linears)))
    result = optimize_bits(store, tiny_loaded, plan, CALIB)
    solver = [c for c in result.candidates if c.source == "optimizer"]
    assert solver and any(isinstance(entry, dict) for c in solver for entry in c.bits)  # still per linear
    for candidate in result.candidates:
        for entry in candidate.bits:
            levels = entry if isinstance(entry, dict) else dict.fromkeys(tiny_loaded.architecture.linears, entry)
            assert set(levels.values()) <= {4, 8}
            assert levels["q"] == levels["k"] == levels["v"] and levels["gate"] == levels["up"], candidate.name
    # the chosen allocation runs under vLLM's rules and is stored for vLLM
    outcome = run_quantization(store, tiny_loaded, plan.quant_plan("optimizer"), CALIB,
                               EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2)),
                               allocation=result.allocation(result.best))
    assert outcome.record.config["target_runtime"] == "vllm" and outcome.record.config["zero_point"] == "integer"
    with pytest.raises(BudgetError, match="3-bit weights"):
        BitsOptimizerPlan(BitBudget(avg_bits=6.0), levels=(3, 4, 8), group_size=32, runtime="vllm")
    untied = replace(plan, runtime="transformers")
    assert not untied.tied and optimization_if_cached(store, tiny_loaded, untied, CALIB) is None


def test_for_vllm_a_group_size_the_checkpoint_cannot_hold_is_refused_before_measuring(store, tiny_loaded):
    plan = BitsOptimizerPlan(BitBudget(avg_bits=6.0), levels=(4, 8), group_size=128, runtime="vllm")
    with pytest.raises(BudgetError, match="multiple of the group size"):  # the tiny model's widths: 64 and 96
        optimize_bits(store, tiny_loaded, plan, CALIB)
    assert optimization_if_cached(store, tiny_loaded, plan, CALIB) is None


def test_a_long_scan_names_what_costs_less(store, tiny_loaded, monkeypatch):
    per_linear = BitsOptimizerPlan(BitBudget(avg_bits=3.5), levels=(2, 3, 4, 8), granularity="module")
    assert bits_optimizer.cheaper_settings(store, tiny_loaded, per_linear, CALIB) is None  # the tiny model: quick
    monkeypatch.setattr(bits_optimizer, "LONG_SCAN_S", 0.0)
    hint = bits_optimizer.cheaper_settings(store, tiny_loaded, per_linear, CALIB)
    assert "a level per layer takes" in hint and "each allowed level costs" in hint
    assert "a level per layer" not in bits_optimizer.cheaper_settings(store, tiny_loaded, PLAN, CALIB)
