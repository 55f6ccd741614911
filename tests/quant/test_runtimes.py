"""Target runtimes: each refuses what it does not run, with what it does; vLLM's fused linears are found in every
family the optimizer supports; runs record their runtime and export only to its format."""

from __future__ import annotations

import pytest

from engine.core.architectures import architecture_of
from engine.core.data import DataSpec
from engine.quant.runtimes import RUNTIMES, fused_groups, runtime_named
from engine.runs.plans import EvalPlan, QuantPlan
from engine.runs.runner import run
from tests.tiny_families import CONFIGS, MOE_FAMILIES, tiny_family_model

CALIB = DataSpec("wiki-offline", "calibration", 32, 2)
EVAL = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))
VLLM = RUNTIMES["vllm"]


def test_each_runtime_refuses_what_it_does_not_run_and_names_what_it_does():
    assert VLLM.problems("rtn", [4, 8], 128, "symmetric") == []
    assert VLLM.problems("rtn", [4, 8], 64, "integer") == []  # vLLM's uint4 / uint8 with zero points
    found = VLLM.problems("rtn", [3, 4], 128, "float")
    assert any("3-bit weights (it takes 4, 8)" in p for p in found)
    assert any("zero point 'float' (it takes integer or symmetric)" in p for p in found)
    assert RUNTIMES["transformers"].problems("rtn", [4], 64, "integer") == [
        "zero point 'integer' (it takes symmetric)"]  # transformers 5.23 cannot load the zero points
    assert VLLM.problems("gptq", [4], 128, "symmetric", act_order=True, dynamic_groups=True) == [
        "act-order with dynamic groups (it takes static groups only)"]
    assert VLLM.problems("llama.cpp", [4]) == ["the llama.cpp quantizer (it takes rtn or gptq)"]
    split = {"q": 4, "k": 8, "v": 4, "o": 4, "gate": 8, "up": 8, "down": 4}
    assert VLLM.problems("rtn", [4, 8], 128, "symmetric", module_levels=[split]) == [
        "q/k/v at different levels (vLLM loads them as one module)"]
    assert RUNTIMES["llama.cpp"].problems("rtn", [4]) == ["the rtn quantizer (it takes llama.cpp)"]
    assert RUNTIMES["research"].problems("rtn", [2, 3, 5], 64, "integer", act_order=True, dynamic_groups=True) == []
    assert RUNTIMES["transformers"].problems("rtn", [2, 3], 64, "symmetric") == []
    message = VLLM.refusal(found)
    assert message.startswith("vLLM (compressed-tensors) does not run") and "target runtime" in message
    with pytest.raises(ValueError, match="Unknown target runtime 'tgi'"):
        runtime_named("tgi")


EXPECTED_FUSED = {"phi3": [],  # qkv_proj and gate_up_proj are already one linear each in the checkpoint
                  "opt": [("q", "k", "v")], "phi": [("q", "k", "v")], "starcoder2": [("q", "k", "v")]}


@pytest.mark.parametrize("family", [f for f in CONFIGS if f not in MOE_FAMILIES])
def test_vllms_fused_groups_are_found_in_every_family(family):
    arch = architecture_of(tiny_family_model(family))
    groups = fused_groups(list(arch.linears), arch.linears)
    expected = EXPECTED_FUSED.get(family, [("q", "k", "v"), ("gate", "up")])
    assert groups == expected, (family, arch.linears)


def test_a_run_records_its_runtime_refuses_what_it_lacks_and_exports_only_its_format(store, tiny_loaded):
    with pytest.raises(ValueError, match="3-bit weights"):
        run(store, tiny_loaded, QuantPlan("rtn", 32, 4, 3, 0.5, zero_point="symmetric", runtime="vllm"), CALIB, EVAL)
    assert store.runs(method="quantization") == []  # refused before any work
    plan = QuantPlan("rtn", 32, 8, 4, 0.5, zero_point="symmetric", runtime="vllm")
    record = run(store, tiny_loaded, plan, CALIB, EVAL).record
    assert record.config["target_runtime"] == "vllm"
    assert record.series == "lim 8/4-bit rtn, symmetric for vLLM (compressed-tensors)"  # not vLLM's default grid
    assert QuantPlan("rtn", 32, 8, 4, 0.5, runtime="vllm").series() == "lim 8/4-bit rtn for vLLM (compressed-tensors)"
    assert QuantPlan("rtn", 32, 4, 2, 0.5, zero_point="float").series() == "lim 4/2-bit rtn, float zero"
    from engine.runs.exports import export_formats, export_run

    formats = export_formats(record, tiny_loaded)
    assert formats["ct"] is None and "made for vLLM" in formats["gguf"] and "re-run" in formats["gguf"]
    result = export_run(store, tiny_loaded, record, "ct", store.path.parent / "ct", dtype="float16")
    assert result["vllm_problems"] == [] and result["verification"]["passed"]  # vLLM's rules, and exact reload
    written = (store.path.parent / "ct" / "model.safetensors").stat().st_size
    assert record.metrics["bytes_16bit"] == written  # the size shown is the checkpoint's, to the byte


def test_a_stack_that_drops_then_quantizes_for_vllm_exports_the_checkpoint_it_was_sized_by(store, tiny_loaded):
    """The path to vLLM for a model without whole layers: the stack is sized as its compressed-tensors checkpoint,
    exports as that folder (one layer fewer, vLLM's rules kept, reloaded exactly in transformers), not as GGUF."""
    import json

    from engine.runs.exports import export_formats, export_run
    from engine.runs.plans import DropPlan, StackPlan

    plan = StackPlan(DropPlan("layer", 1, "custom", custom=(1,)),
                     QuantPlan("rtn", 32, 8, 4, 0.5, zero_point="symmetric", runtime="vllm"))
    record = run(store, tiny_loaded, plan, CALIB, EVAL).record
    assert record.config["runs_in"] == "vLLM (compressed-tensors)"
    formats = export_formats(record, tiny_loaded)
    assert formats["ct"] is None and "llama.cpp's types" in formats["gguf"] and "16-bit" in formats["hf"]
    folder = store.path.parent / "stack-ct"
    result = export_run(store, tiny_loaded, record, "ct", folder, dtype="float16")
    assert result["vllm_problems"] == [] and result["verification"]["passed"], result["summary"]
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == tiny_loaded.num_layers - 1
    assert record.metrics["bytes_16bit"] == (folder / "model.safetensors").stat().st_size  # to the byte
    from engine.methods import method_named

    quantize_s = record.config["stages"][1]["quantize_s"]  # the export's estimate: dropping again is free
    assert method_named("stacked").rebuild_seconds(record) == quantize_s < record.metrics["compress_s"]
    floating = run(store, tiny_loaded, StackPlan(plan.first, QuantPlan("rtn", 32, 8, 4, 0.5, zero_point="float")),
                   CALIB, EVAL).record
    assert "float zero point" in export_formats(floating, tiny_loaded)["ct"]  # an fp16 minimum: no ct form
    assert floating.config["runs_in"].startswith("nowhere as one file")


def test_compressed_tensors_runtimes_count_integer_zero_points_as_their_checkpoint_packs_them(tiny_loaded):
    """A zero point per group is an fp16 number in LayerLab's own files but ``bits`` bits in a compressed-tensors
    checkpoint: vLLM's sizes, and the budgets its optimizer solves, count it as the checkpoint does (and vLLM's 8-bit
    weights are symmetric: Marlin's zero-point kernels take 4 bits only)."""
    spec = QuantPlan("rtn", 32, 8, 4, 0.5, runtime="vllm").spec()
    assert (spec.zero_point_at(4), spec.zero_point_at(8), spec.grid) == ("integer", "symmetric", "symmetric")
    assert QuantPlan("rtn", 32, 8, 4, 0.5).spec().zero_point_at(8) == "integer"  # the research grid: every width
    assert [VLLM.zero_point_at(4), VLLM.zero_point_at(8), VLLM.zero_point_at(4, "symmetric")] == [
        "integer", "symmetric", "symmetric"]  # what the Sensitivity page and the optimizer measure at each level
    assert RUNTIMES["transformers"].zero_point_at(4) == "symmetric"
    assert RUNTIMES["research"].zero_point_at(8) == "integer"
    from engine.optimize.bit_budget import BitBudget
    from engine.quant.grid import weight_storage_bits
    from engine.runs.bits_optimizer import BitsOptimizerPlan, plan_costs

    assert weight_storage_bits(576, 576, 4, 64, zero_point="integer", packed_zeros=True) / 576**2 == 4 + 20 / 64
    assert weight_storage_bits(576, 576, 4, 64, zero_point="integer") / 576**2 == 4 + 32 / 64
    assert weight_storage_bits(576, 576, 4, 64, zero_point="symmetric", packed_zeros=True) / 576**2 == 4 + 16 / 64
    vllm = BitsOptimizerPlan(BitBudget(avg_bits=6.0), levels=(4, 8), group_size=32, runtime="vllm")
    research = BitsOptimizerPlan(BitBudget(avg_bits=6.0), levels=(4, 8), group_size=32, runtime="research")
    packed, own = plan_costs(tiny_loaded, vllm), plan_costs(tiny_loaded, research)
    weights = sum(packed.weights)
    assert [sum(row[j] for row in packed.bits) / weights for j in range(2)] == [4 + 20 / 32, 8 + 16 / 32]
    assert [sum(row[j] for row in own.bits) / weights for j in range(2)] == [4 + 32 / 32, 8 + 32 / 32]


def test_runs_stored_before_series_named_their_grid_never_share_a_curve_with_another_grid():
    from engine.runs.record import RunRecord

    def stored(series: str, zero_point: str, runtime: str) -> str:
        config = {"series": series, "quantizer": "rtn", "zero_point": zero_point, "target_runtime": runtime}
        return RunRecord(1, "", "m", "f", "quantization", config, {}, {}, 0.0).series

    assert stored("lim 8/4-bit rtn for vLLM (compressed-tensors)", "symmetric", "vllm") == \
        "lim 8/4-bit rtn, symmetric for vLLM (compressed-tensors)"  # vLLM's grid before the integer one
    assert stored("lim 8/4-bit rtn for vLLM (compressed-tensors)", "integer", "vllm") == \
        "lim 8/4-bit rtn for vLLM (compressed-tensors)"
    assert stored("lim 4/3-bit rtn", "float", "research") == "lim 4/3-bit rtn, float zero"
    assert stored("lim 4/3-bit rtn, float zero", "float", "research") == "lim 4/3-bit rtn, float zero"  # once
    stack = {"series": "drop 2 then 4-bit", "stages": [{}, {"quantizer": "rtn", "zero_point": "symmetric"}]}
    assert RunRecord(2, "", "m", "f", "stacked", stack, {}, {}, 0.0).series == "drop 2 then 4-bit"  # its own series
