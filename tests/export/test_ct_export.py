"""compressed-tensors folders: symmetric mixed-bit models that plain transformers loads and computes exactly."""

from __future__ import annotations

import importlib.util
import json
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from engine.core.data import DataSpec
from engine.core.models import LoadedModel
from engine.export.ct_folder import ct_unsupported, write_ct_folder
from engine.export.hf_folder import ExportError
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import clear_memory_cache, quantize_model
from engine.quant.runtimes import RUNTIMES
from engine.runs.exports import check_export, export_formats, export_run
from engine.runs.plans import EvalPlan, QuantPlan
from engine.runs.runner import run_quantization
from tests.export.test_hf_export import _reload_in_fresh_process
from tests.tiny_families import tiny_family_model

SYMMETRIC = QuantizerSpec(bits=4, group_size=32, zero_point="symmetric")
CT_FAMILIES = ("llama", "qwen2", "mistral", "gemma", "phi3")
CALIB = DataSpec("wiki-offline", "calibration", 32, 2)
EVAL = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))


def _bits(n_layers: int) -> list[int]:
    return [(2, 3, 4, 5, 8)[i % 5] for i in range(n_layers)]


def _allocation(loaded: LoadedModel) -> list:
    """Llama: layer 0 with a level per linear (the optimizer's module granularity); others a level per layer."""
    bits = _bits(loaded.num_layers)
    if loaded.architecture.model_type == "llama":
        bits[0] = {name: 8 if name == "v" else 3 for name in loaded.architecture.linears}
    return bits


def test_mixed_bits_reload_exactly_in_a_fresh_process_without_layerlab(tmp_path):
    folders, expected = [], []
    probe = torch.randint(0, 100, (2, 12))
    for family in CT_FAMILIES:
        loaded = LoadedModel.from_model(tiny_family_model(family))
        quantized = quantize_model(loaded, _allocation(loaded), spec=SYMMETRIC)
        info = write_ct_folder(quantized, loaded, tmp_path / family)
        assert not info["remote_code"] and info["exact_fraction"] == 1.0
        assert info["weights_bytes"] == (tmp_path / family / "model.safetensors").stat().st_size < info["bytes"]
        config = json.loads((tmp_path / family / "config.json").read_text())["quantization_config"]
        widths = {g["weights"]["num_bits"] for g in config["config_groups"].values()}
        levels = {w.bits for layer in quantized.weights for w in layer.values()}
        assert widths == levels and config["format"] == "pack-quantized"
        folders.append(tmp_path / family)
        with torch.no_grad():
            expected.append(quantized.model(probe).logits)
    for family, want, got in zip(CT_FAMILIES, expected, _reload_in_fresh_process(folders, probe)):
        torch.testing.assert_close(got["logits"], want, rtol=0, atol=1e-5, msg=family)
        assert got["generated"].shape == (2, 7)


def test_the_file_holds_packed_codes_not_dense_weights(tiny_loaded, tmp_path):
    quantized = quantize_model(tiny_loaded, [2, 3, 4, 8], spec=SYMMETRIC)
    write_ct_folder(quantized, tiny_loaded, tmp_path / "ct")
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("model.layers.0.mlp.down_proj.weight_packed")
        down = quantized.weights[0]["down"]
        assert packed.dtype == torch.int32 and packed.numel() * 32 == down.shape[0] * down.shape[1] * 2  # 2 bits
    assert "model.layers.0.self_attn.q_proj.weight" not in keys
    assert "model.layers.0.self_attn.q_proj.weight_zero_point" not in keys  # symmetric: no zero stored


def test_exported_files_get_the_usual_modes(tiny_loaded, tmp_path):
    """Staging is private (mkdtemp 0700, safetensors' temporary file 0600); the finished export is not."""
    umask = os.umask(0)
    os.umask(umask)
    write_ct_folder(quantize_model(tiny_loaded, [4] * 4, spec=SYMMETRIC), tiny_loaded, tmp_path / "ct")
    assert stat.S_IMODE((tmp_path / "ct").stat().st_mode) == 0o777 & ~umask
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "ct").iterdir()} == {0o666 & ~umask}


def test_a_missing_package_is_named(tiny_loaded, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "compressed_tensors"
                        else real(name, *a))
    assert "pip install compressed-tensors" in ct_unsupported(tiny_loaded, SYMMETRIC)


def test_grids_the_format_cannot_hold_are_refused_with_what_to_do(tiny_loaded, tmp_path):
    assert ct_unsupported(tiny_loaded, QuantizerSpec(group_size=32)) is None  # the integer grid: zero points
    assert "zero point 'integer' or 'symmetric'" in ct_unsupported(tiny_loaded, QuantizerSpec(zero_point="float"))
    wide = ct_unsupported(tiny_loaded, QuantizerSpec(group_size=48, zero_point="symmetric"))
    assert "multiple of the group size" in wide and "group size 32" in wide  # names the sizes that fit
    assert ct_unsupported(tiny_loaded, QuantizerSpec(group_size=None, zero_point="symmetric")) is None
    dynamic = QuantizerSpec(method="gptq", act_order=True, group_params="dynamic", zero_point="symmetric")
    assert "static groups" in ct_unsupported(tiny_loaded, dynamic)
    with pytest.raises(ExportError, match="float"):
        write_ct_folder(quantize_model(tiny_loaded, [4] * 4, spec=QuantizerSpec(group_size=32, zero_point="float")),
                        tiny_loaded, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_a_symmetric_run_exports_and_verifies_exactly(store, tiny_loaded, tmp_path):
    plan = QuantPlan(group_size=32, low_bits=3, low_fraction=0.5, ordering="random", zero_point="symmetric")
    run = run_quantization(store, tiny_loaded, plan, CALIB, EVAL)
    assert export_formats(run.record, tiny_loaded)["ct"] is None
    clear_memory_cache()  # as in a new process (the CLI): the layers come back from the disk cache
    result = export_run(store, tiny_loaded, run.record, "ct", tmp_path / "ct")
    check = result["verification"]
    assert check["passed"] and check["rel_diff"] == pytest.approx(0.0, abs=1e-9) and result["reader"] == "transformers"
    assert store.get_run(run.run_id).config["exports"][0]["format"] == "ct"
    half = export_run(store, tiny_loaded, run.record, "ct", tmp_path / "ct16", dtype="float16")
    assert half["bytes"] < result["bytes"] and half["dtype"] == "float16" and half["verification"]["passed"]
    assert any("rounded to float16" in note for note in half["notes"])
    floating = run_quantization(store, tiny_loaded, QuantPlan(group_size=32, ordering="random", zero_point="float"),
                                CALIB, EVAL)
    with pytest.raises(ExportError, match="cannot be exported as ct.*float zero point"):
        check_export(tiny_loaded, floating.record, "ct", tmp_path / "x", overwrite=False)
    assert not Path(tmp_path / "x").exists()


def test_an_integer_zero_point_run_exports_with_packed_zero_points_and_verifies_exactly(store, tiny_loaded, tmp_path):
    """The integer grid is compressed-tensors' asymmetric scheme: vLLM's layout, read back by compressed-tensors'
    own decompressor (transformers 5.23 refuses the zero points) and computing exactly what the run measured."""
    plan = QuantPlan(group_size=32, high_bits=8, low_bits=4, low_fraction=0.5, ordering="random", runtime="vllm")
    assert plan.zero_point == "integer" == RUNTIMES["vllm"].default_zero_point
    run = run_quantization(store, tiny_loaded, plan, CALIB, EVAL)
    first = export_run(store, tiny_loaded, run.record, "ct", tmp_path / "ct32")
    exact, exact_reader = first["verification"], first["reader"]
    assert exact["passed"] and exact["rel_diff"] == pytest.approx(0.0, abs=1e-9)
    result = export_run(store, tiny_loaded, run.record, "ct", tmp_path / "ct", dtype="float16")
    assert any("loads as written; transformers 5.23 does not load its zero points" in n for n in result["notes"])
    assert result["reader"] == "compressed-tensors" and exact_reader == "compressed-tensors"
    assert result["verification"]["passed"] and result["vllm_problems"] == []
    written = (tmp_path / "ct" / "model.safetensors").stat().st_size
    assert written == run.record.metrics["bytes_16bit"]  # the run's size is the checkpoint's, to the byte
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    symmetric = {g["weights"]["num_bits"]: g["weights"]["symmetric"] for g in config["config_groups"].values()}
    assert symmetric == {4: False, 8: True}  # zero points at 4 bits (Marlin's uint4); 8-bit weights symmetric
    layer = run.record.config["bits"].index(4)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        zeros = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight_zero_point")
        scales = f.get_tensor(f"model.layers.{layer}.mlp.down_proj.weight_scale")
        assert f"model.layers.{run.record.config['bits'].index(8)}.mlp.down_proj.weight_zero_point" not in f.keys()
    assert zeros.dtype == torch.int32 and list(zeros.shape) == [64 * 4 // 32, scales.shape[1]]  # vLLM's layout
    research = run_quantization(store, tiny_loaded, replace(plan, runtime="research"), CALIB, EVAL)
    folder = export_run(store, tiny_loaded, research.record, "ct", tmp_path / "research")
    assert folder["vllm_problems"] == ["group_8bit: a zero point at 8 bits (vLLM's kernels take zero points at 4 bits "
                                       "only)"] and folder["verification"]["passed"]


@pytest.mark.parametrize("group_size", [32, None])
def test_integer_grid_folders_of_every_family_reload_exactly(tmp_path, group_size):
    from engine.export.ct_folder import ct_weights_bytes, load_ct_folder

    probe = torch.randint(0, 100, (2, 12))
    for family in CT_FAMILIES:
        loaded = LoadedModel.from_model(tiny_family_model(family))
        quantized = quantize_model(loaded, _allocation(loaded),
                                   spec=QuantizerSpec(group_size=group_size, zero_point="integer"))
        write_ct_folder(quantized, loaded, tmp_path / family)
        assert (tmp_path / family / "model.safetensors").stat().st_size == ct_weights_bytes(quantized, loaded, None)
        with torch.no_grad():
            want, got = quantized.model(probe).logits, load_ct_folder(tmp_path / family)(probe).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5, msg=family)


def test_vllm_rules_name_what_vllm_would_refuse(tiny_loaded, tmp_path):
    """vLLM's WNA16 scheme: 4 or 8 bits, zero points only at 4/8, group or channel, one scheme per fused module."""
    from engine.export.vllm_rules import vllm_problems

    arch = tiny_loaded.architecture
    served = quantize_model(tiny_loaded, [4, 8, 4, 8], spec=SYMMETRIC)
    assert write_ct_folder(served, tiny_loaded, tmp_path / "ok")["vllm_problems"] == []
    per_linear = {name: 8 if name == "v" else 4 for name in arch.linears}  # q, k at 4 bits, v at 8: split qkv
    mixed = quantize_model(tiny_loaded, [3, per_linear, 4, 4], spec=SYMMETRIC)
    info = write_ct_folder(mixed, tiny_loaded, tmp_path / "mixed")
    problems = info["vllm_problems"]
    assert any(p.startswith("group_3bit: 3-bit weights") for p in problems)
    assert any("fused modules whose parts have different bit widths" in p and "qkv_proj" in p for p in problems)
    assert any(n.startswith("vLLM would refuse this folder") for n in info["notes"])
    assert vllm_problems({"config_groups": {"g": {"targets": ["x"], "weights": {
        "num_bits": 8, "symmetric": False, "strategy": "group", "group_size": None}}}}) == [
        "g: a zero point at 8 bits (vLLM's kernels take zero points at 4 bits only)",
        "g: strategy 'group' with group size None (vLLM takes 'group' with a group size, or 'channel')"]


def test_a_plan_for_a_folder_runtime_starts_from_a_group_size_the_model_can_hold(tiny_loaded, monkeypatch):
    """The Compare page's sweep and stack and the CLI start from 128, except where the model's widths need a
    smaller group for a compressed-tensors runtime (SmolLM2's 576: 64); runtimes without folders keep 128."""
    from engine.export import ct_folder
    from engine.quant.runtimes import RUNTIMES

    vllm, transformers = RUNTIMES["vllm"], RUNTIMES["transformers"]
    assert ct_folder.default_group_size(tiny_loaded, vllm) == 32  # widths 64 and 96: only 32 divides both
    for fitting, runtime, expected in (([32, 64], vllm, 64), ([32, 64, 128, 256], vllm, 128),
                                       ([256], transformers, 256), ([256], vllm, None)):  # vLLM takes up to 128
        monkeypatch.setattr(ct_folder, "ct_group_sizes", lambda loaded, fitting=fitting: fitting)
        assert ct_folder.default_group_size(tiny_loaded, runtime) == expected, (fitting, runtime.key)
    monkeypatch.setattr(ct_folder, "ct_group_sizes", lambda loaded: [])
    assert ct_folder.default_group_size(tiny_loaded, transformers) is None  # one scale per row
    assert ct_folder.default_group_size(tiny_loaded, RUNTIMES["llama.cpp"]) == 128
    assert ct_folder.default_group_size(tiny_loaded, RUNTIMES["research"]) == 128
