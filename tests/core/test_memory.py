"""Memory plans: parts by method, the codes a quantized variant holds, refusals before any work (#18)."""

from __future__ import annotations

import pytest
import torch

from engine.core.data import DataSpec
from engine.core.memory import (
    EVAL_BUDGET,
    ModelShape,
    activation_bytes,
    evaluation_batch,
    evaluation_bytes,
    plan_memory,
)
from engine.evaluation.perplexity import perplexity
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model
from engine.quant.quantized_linear import held_code_bytes
from engine.runs.memory_check import RunDoesNotFit, run_memory_plan
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan
from engine.runs.runner import run_dropping, run_quantization
from engine.runs.store import ResultsStore

CALIB = DataSpec(split="calibration", seqlen=32, n_windows=4)
EVAL = EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))


def test_parts_follow_what_each_method_holds(tiny_loaded):
    shape = ModelShape.of(tiny_loaded.model, tiny_loaded.architecture)
    plans = {m: plan_memory(shape, m, "cpu", calib_tokens=128, eval_seqlen=32, free=2**40)
             for m in ("dropping", "quantization-rtn", "quantization-gptq", "slicing")}
    assert set(plans["dropping"].parts) == {"evaluation activations"}  # the variant shares the base
    assert plans["quantization-rtn"].parts["codes"] < shape.bytes / 3
    assert plans["quantization-gptq"].parts.get("working copy", shape.bytes) == shape.bytes
    assert plans["slicing"].parts["sliced model"] == shape.bytes
    assert plans["dropping"].extra_bytes < plans["quantization-rtn"].extra_bytes < plans["slicing"].extra_bytes
    assert evaluation_bytes(shape, 4, 64) > 2 * evaluation_bytes(shape, 4, 32) * 0.99  # grows with the window
    assert all(p.fits() and p.refusal() is None for p in plans.values())
    assert "free on cpu" in plans["slicing"].summary()


@pytest.mark.parametrize("group", [32, None])
def test_planned_codes_are_the_bytes_a_variant_holds(tiny_loaded, group):
    shape = ModelShape.of(tiny_loaded.model, tiny_loaded.architecture)
    plan = plan_memory(shape, "quantization-rtn", "cpu", group_size=group, code_bits=3, free=2**40)
    variant = quantize_model(tiny_loaded, [3] * tiny_loaded.num_layers,
                             spec=QuantizerSpec(method="rtn", group_size=group), use_cache=False)
    assert plan.parts["codes"] == held_code_bytes(variant.model)
    mixed = quantize_model(tiny_loaded, [2, 8] * (tiny_loaded.num_layers // 2),
                           spec=QuantizerSpec(method="rtn", group_size=group), use_cache=False)
    upper = plan_memory(shape, "quantization-rtn", "cpu", group_size=group, code_bits=8, free=2**40)
    assert held_code_bytes(mixed.model) < upper.parts["codes"]  # the highest level bounds a mixed allocation


def test_a_run_that_does_not_fit_is_refused_before_any_work(tiny_loaded, monkeypatch):
    store = ResultsStore()
    before = [r.id for r in store.runs()]
    weights = {k: v.clone() for k, v in tiny_loaded.model.state_dict().items()}
    monkeypatch.setattr("engine.core.memory.free_bytes", lambda device: 2**20)  # 1 MiB free
    plan = run_memory_plan(tiny_loaded, "quantization-gptq", CALIB, EVAL, 32, reads_calibration=True)
    assert not plan.fits() and "only 1.0 MiB are free" in plan.refusal()
    with pytest.raises(RunDoesNotFit, match="Use a shorter evaluation seqlen|full copy|fewer calibration"):
        run_quantization(store, tiny_loaded, QuantPlan("gptq", 32, 4, 2, 0.5, ordering="random"), CALIB, EVAL)
    with pytest.raises(RunDoesNotFit):
        run_dropping(store, tiny_loaded, DropPlan("layer", 1, "custom", custom=(1,)), CALIB, EVAL)
    assert [r.id for r in store.runs()] == before
    assert all(torch.equal(v, weights[k]) for k, v in tiny_loaded.model.state_dict().items())



def test_evaluation_batch_keeps_activations_within_the_budget(tiny_loaded, monkeypatch):
    shape = ModelShape.of(tiny_loaded.model, tiny_loaded.architecture)
    batches = [evaluation_batch(shape, seqlen, requested=4) for seqlen in (8, 32, 128, 512, 4096)]
    assert batches == sorted(batches, reverse=True) and set(batches) <= {1, 2, 3, 4}
    assert batches[0] == 4 and batches[-1] == 1  # short windows batch up; long ones go one at a time
    for seqlen, batch in zip((8, 32, 128, 512, 4096), batches):
        assert batch == 1 or activation_bytes(shape, batch, seqlen) <= EVAL_BUDGET * shape.bytes
        assert batch == 4 or activation_bytes(shape, batch + 1, seqlen) > EVAL_BUDGET * shape.bytes  # the most
    assert evaluation_batch(shape, 8, requested=2) == 2  # never more than asked
    seen = []  # a run evaluates with that batch

    def spy(model, windows, batch_size, progress=None, observer=None):
        seen.append(batch_size)
        return perplexity(model, windows, batch_size=batch_size, observer=observer)

    monkeypatch.setattr("engine.runs.runner.perplexity", spy)
    long_eval = EvalPlan(DataSpec(split="evaluation", seqlen=512, n_windows=2))
    assert evaluation_batch(shape, 512) < 4
    run_dropping(ResultsStore(), tiny_loaded, DropPlan(block="layer", count=1, by="custom", custom=(1,)), CALIB,
                 long_eval)
    assert seen and set(seen) == {evaluation_batch(shape, 512)}  # dense and the dropped model
