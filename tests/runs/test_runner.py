"""Runs through the one runner (tiny model): dense once per windows, change vs dense, plans passed in, sweeps."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.core.data import DataSpec
from engine.core.paths import FolderExistsError
from engine.methods.quantization import allocation_for
from engine.methods.slicing import slicing_schedule
from engine.runs.cached_scores import ScoresNotComputed
from engine.runs.plans import EvalPlan, QuantPlan, SlicingPlan
from engine.runs.runner import (
    default_save_folder,
    ensure_dense,
    run_quantization,
    run_slicing,
)
from engine.runs.sweeps import quantization_sweep, run_sweep, slicing_sweep
from engine.slicing.schedules import schedule_custom

CALIB = DataSpec("wiki-offline", "calibration", 32, 2)
EVAL = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))


def test_dense_is_measured_once_per_windows_and_compared(store, tiny_loaded):
    first = ensure_dense(store, tiny_loaded, EVAL)
    assert ensure_dense(store, tiny_loaded, EVAL).id == first.id
    other = ensure_dense(store, tiny_loaded, replace(EVAL, data=replace(EVAL.data, n_windows=1)))
    assert other.id != first.id
    outcome = run_quantization(store, tiny_loaded, QuantPlan(ordering="random", low_bits=3), CALIB, EVAL)
    m = outcome.metrics
    assert m["dense_run"] == first.id and m["ppl_change"] == pytest.approx(m["ppl"] / m["dense_ppl"] - 1)
    assert [r.method for r in store.runs()].count("dense") == 2


def test_the_previewed_schedule_is_the_one_that_runs(store, tiny_loaded):
    schedule = schedule_custom([0.25, 0.0, 0.5, 0.125])
    outcome = run_slicing(store, tiny_loaded, SlicingPlan("custom", fractions=schedule.fractions, round_to=8),
                          CALIB, EVAL, schedule=schedule)
    assert outcome.config["dims"] == [48, 64, 32, 56]
    assert outcome.record.data_label == "wiki-offline evaluation, 2 windows × 32 tokens"


def test_previews_never_score_on_their_own(store, tiny_loaded):
    with pytest.raises(ScoresNotComputed):
        slicing_schedule(store, tiny_loaded, SlicingPlan("dynamic"), CALIB, compute=False)
    with pytest.raises(ScoresNotComputed):
        allocation_for(store, tiny_loaded, QuantPlan(ordering="lim"), CALIB, compute=False)
    allocation, importance = allocation_for(store, tiny_loaded, QuantPlan(ordering="random"), CALIB, compute=False)
    assert importance is None and len(allocation.bits) == 4


def test_saves_never_overwrite(store, tiny_loaded):
    plan = SlicingPlan("constant", 0.25)
    folder = default_save_folder(tiny_loaded, plan)
    outcome = run_slicing(store, tiny_loaded, plan, CALIB, EVAL, save_to=folder)
    assert outcome.config["saved_to"] == str(folder)
    assert default_save_folder(tiny_loaded, plan) != folder  # the next one gets a new name
    with pytest.raises(FolderExistsError):
        run_slicing(store, tiny_loaded, plan, CALIB, EVAL, save_to=folder)


def test_sweeps_are_generated_in_one_place_and_keep_going_after_an_error(store, tiny_loaded):
    plans = slicing_sweep(SlicingPlan(), [0.1, 0.2], [0.0, 0.15])
    assert [(p.schedule, p.target, p.basis) for p in plans] == [
        ("constant", 0.1, 0.1), ("constant", 0.2, 0.2), ("dynamic", 0.1, 0.0), ("dynamic", 0.2, 0.0),
        ("dynamic", 0.2, 0.15)]
    with pytest.raises(ValueError, match="wavy"):
        slicing_sweep(SlicingPlan(), [0.1], [0.0], ["wavy"])
    quant = quantization_sweep(QuantPlan(), [3], ["random"], [0.0, 0.5, 2.0])  # 2.0: an impossible fraction
    result = run_sweep(quant, lambda p: run_quantization(store, tiny_loaded, p, CALIB, EVAL))
    assert len(result.outcomes) == 2 and len(result.errors) == 1
    assert result.errors[0][0].low_fraction == 2.0


def test_dropping_runs_store_honest_sizes_and_stacks_reload(store, tiny_loaded):
    from engine.runs.drop_choice import dropped_layers
    from engine.runs.plans import DropPlan
    from engine.runs.runner import run_dropping, run_stacked

    plan = DropPlan(block="layer", count=1, by="lr")
    layers = dropped_layers(store, tiny_loaded, plan, CALIB)
    assert len(layers) == 1 and layers[0] not in (0, 3)  # first and last protected
    outcome = run_dropping(store, tiny_loaded, plan, CALIB, EVAL, layers=layers)
    m = outcome.metrics
    assert m["param_fraction"] < 1 and m["size_fraction"] == pytest.approx(m["param_fraction"])
    assert outcome.config["layers"] == layers and outcome.record.method == "dropping"
    stacked = run_stacked(store, tiny_loaded, DropPlan(block="mlp", count=1, by="mlp"),
                          QuantPlan(ordering="lim", low_bits=3, low_fraction=0.5), CALIB, EVAL)
    stored = store.get_run(stacked.run_id)
    assert [s["method"] for s in stored.config["stages"]] == ["dropping", "quantization"]
    # the tiny model is mostly its (16-bit) embedding, so quantizing the rest saves less than it would at scale
    assert stored.metrics["size_fraction"] < m["size_fraction"] and stored.metrics["dense_run"]
    sliced = run_stacked(store, tiny_loaded, SlicingPlan("constant", 0.25), QuantPlan(ordering="lim"), CALIB, EVAL)
    assert sliced.config["stages"][0]["method"] == "slicing" and sliced.metrics["ppl"] > 1
    with pytest.raises(ValueError, match="first stage"):
        run_stacked(store, tiny_loaded, QuantPlan(), QuantPlan(), CALIB, EVAL)


def test_dropping_by_measured_sensitivity_drops_a_constructed_identity_layer(store, tiny_folder):
    """Layer 2 adds nothing to the residual stream: its measured drop KL is 0, so it goes first."""
    from engine.core.architectures import get_submodule
    from engine.core.models import load_model
    from engine.runs.drop_choice import dropped_layers, measured_drop_kl
    from engine.runs.plans import DropPlan

    loaded = load_model(tiny_folder)
    layer = loaded.architecture.decoder_layers(loaded.model)[2]
    for path in (loaded.architecture.attn_output, loaded.architecture.mlp_output):
        get_submodule(layer, path).weight.data.zero_()
    loaded = type(loaded).from_model(loaded.model, loaded.tokenizer, "identity layer 2")
    plan = DropPlan(block="layer", count=1, by="sensitivity")
    calib = replace(CALIB, n_windows=4)  # the sensitivity lab's smallest sample
    with pytest.raises(ValueError, match="too few"):
        dropped_layers(store, loaded, plan, CALIB)
    with pytest.raises(ScoresNotComputed) as missing:
        dropped_layers(store, loaded, plan, calib, compute=False)
    assert missing.value.compute is not None and "sensitivity" in missing.value.what
    assert missing.value.compute(None) == [2]
    assert dropped_layers(store, loaded, plan, calib, compute=False) == [2]  # measured once, then cached
    kl = measured_drop_kl(store, loaded, plan, calib)
    assert kl[2] == pytest.approx(0.0, abs=1e-9) and min(kl[1], kl[3]) > 1e-6


def test_iterative_dropping_re_scores_the_smaller_model_and_is_stored(store, tiny_loaded):
    from engine.runs.drop_choice import dropped_layers
    from engine.runs.plans import DropPlan
    from engine.runs.runner import run_dropping

    at_once = dropped_layers(store, tiny_loaded, DropPlan(count=2, protect_ends=False), CALIB)
    plan = DropPlan(count=2, protect_ends=False, iterative=True)
    with pytest.raises(ScoresNotComputed):  # the partly dropped model has no scores yet
        dropped_layers(store, tiny_loaded, plan, CALIB, compute=False)
    iterative = dropped_layers(store, tiny_loaded, plan, CALIB)
    assert len(iterative) == 2 and set(iterative) & set(at_once)  # the first pick is the dense model's top
    assert dropped_layers(store, tiny_loaded, plan, CALIB, compute=False) == iterative  # cached per fingerprint
    outcome = run_dropping(store, tiny_loaded, plan, CALIB, EVAL, layers=iterative)
    assert outcome.config["iterative"] and "iteratively" in outcome.config["choice"]
    assert outcome.record.config["series"] == "drop layers by lr, iterative"


@pytest.mark.parametrize("block", ["attention", "mlp"])
def test_iterative_block_dropping_by_sensitivity_re_measures_the_smaller_model(store, tiny_loaded, block):
    from engine.runs.drop_choice import dropped_layers
    from engine.runs.plans import DropPlan

    plan = DropPlan(block, 2, "sensitivity", protect_ends=False, iterative=True)
    calib = replace(CALIB, n_windows=4)
    layers = dropped_layers(store, tiny_loaded, plan, calib)
    assert len(layers) == 2
    assert dropped_layers(store, tiny_loaded, plan, calib, compute=False) == layers  # the choice is cached


def test_estimates_count_the_scores_a_run_would_compute_first(store, tiny_loaded):
    """A run ordered by LR scores that are not cached scores first: its estimate counts one scoring pass, which
    goes once the scores are stored; a random order needs none.  A stack that drops layers also scores the
    smaller model anew (unless the same layers were dropped before), and a slicing-first stack orders its bits by
    dense's scores."""
    from engine.runs.cached_scores import scores_for
    from engine.runs.plans import DropPlan, StackPlan
    from engine.runs.runner import estimate_run_seconds, scoring_seconds

    lim, random_order = QuantPlan(ordering="lim", low_bits=3), QuantPlan(ordering="random", low_bits=3)
    before = estimate_run_seconds(tiny_loaded, lim, CALIB, EVAL, store)
    stack = StackPlan(SlicingPlan("constant", 0.25), lim)
    stack_before = estimate_run_seconds(tiny_loaded, stack, CALIB, EVAL, store)
    scores_for(store, tiny_loaded, CALIB, compute=True)
    after = estimate_run_seconds(tiny_loaded, lim, CALIB, EVAL, store)
    assert before - after == pytest.approx(scoring_seconds(tiny_loaded, CALIB), rel=1e-6)
    assert after == pytest.approx(estimate_run_seconds(tiny_loaded, random_order, CALIB, EVAL, store), rel=1e-6)
    assert stack_before - estimate_run_seconds(tiny_loaded, stack, CALIB, EVAL, store) == pytest.approx(
        scoring_seconds(tiny_loaded, CALIB), rel=1e-6)
    dropped_lim = StackPlan(DropPlan("layer", 1), lim)
    dropped_random = StackPlan(DropPlan("layer", 1), random_order)
    fresh = estimate_run_seconds(tiny_loaded, dropped_lim, CALIB, EVAL, store, dense_needed=False)
    assert fresh > estimate_run_seconds(tiny_loaded, dropped_random, CALIB, EVAL, store,
                                        dense_needed=False)  # the dropped model is scored anew to order the bits
    from engine.runs.runner import run

    run(store, tiny_loaded, dropped_lim, CALIB, EVAL)  # the same layers dropped again: their scores are stored
    again = StackPlan(DropPlan("layer", 1), QuantPlan(ordering="lim", low_bits=2))
    assert estimate_run_seconds(tiny_loaded, again, CALIB, EVAL, store, dense_needed=False) < fresh
