"""Hugging Face exports load in plain transformers (a fresh process with no LayerLab on its path) and match."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.core.data import DataSpec
from engine.core.models import LoadedModel
from engine.core.paths import FolderExistsError
from engine.dropping.drop_model import drop_model
from engine.export.hf_folder import ExportError, write_hf_folder
from engine.runs.exports import check_export, export_formats, export_run
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan
from engine.runs.runner import run_dropping, run_quantization, run_slicing
from engine.slicing.schedules import schedule_custom
from engine.slicing.slice_model import slice_model
from tests.slicing.test_slicing import logits, windows
from tests.tiny_families import SLICING_FAMILIES, tiny_family_model

CALIB = DataSpec("wiki-offline", "calibration", 32, 2)
EVAL = EvalPlan(DataSpec("wiki-offline", "evaluation", 32, 2))

_FRESH = """
import json, sys, torch, transformers
from pathlib import Path
probe = torch.load(sys.argv[1])
for name in sys.argv[2:]:
    folder = Path(name)
    config = json.loads((folder / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, trust_remote_code="auto_map" in config).eval()
    with torch.no_grad():
        out = model(probe).logits
        generated = model.generate(probe[:, :4], max_new_tokens=3, do_sample=False)
    torch.save({"logits": out, "generated": generated}, folder.with_name(folder.name + "-out.pt"))
print(json.dumps({"layerlab_imported": any(m == "engine" or m.startswith("engine.") for m in sys.modules)}))
"""


def _reload_in_fresh_process(folders: list[Path], probe: torch.Tensor) -> list[dict]:
    """Load each folder with transformers alone (one Python process, cwd outside the project, no PYTHONPATH)
    and run ``probe`` through it: logits and a greedy 3-token generation (KV cache) per folder."""
    probe_file = folders[0].parent / "probe.pt"
    torch.save(probe, probe_file)
    result = subprocess.run([sys.executable, "-c", _FRESH, str(probe_file), *map(str, folders)],
                            capture_output=True, text=True, cwd=folders[0].parent,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"layerlab_imported": False}
    return [torch.load(folder.with_name(folder.name + "-out.pt")) for folder in folders]


def _dropped_export(block: str, folder: Path):
    dropped = drop_model(LoadedModel.from_model(tiny_family_model("llama")), block, [1])
    info = write_hf_folder(dropped.model, dropped.architecture, folder)
    config = json.loads((folder / "config.json").read_text())
    if block == "layer":
        assert not info["remote_code"] and "auto_map" not in config and config["num_hidden_layers"] == 2
    else:
        assert info["remote_code"] and config["layerlab_variant"]["skipped"] == {block: [1]}
    return dropped.model


def test_dropped_layers_export_is_a_plain_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _dropped_export("layer", tmp_path / "export")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    probe = windows(n=2, seed=3).input_ids
    torch.testing.assert_close(logits(reloaded, probe), logits(model, probe), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # one fresh Python process loads all 13 exports (~1 min)
def test_every_export_loads_with_transformers_alone_and_matches(tmp_path):
    """Sliced exports of every family slicing supports (per-layer widths) and the three dropped kinds load
    in a fresh process with transformers alone and compute what the app's model computes."""
    models: dict[Path, torch.nn.Module] = {}
    for name in SLICING_FAMILIES:
        loaded = LoadedModel.from_model(tiny_family_model(name))
        sliced = slice_model(loaded, schedule_custom([0.25, 0.0, 0.5]), windows(), batch_size=4)
        folder = tmp_path / f"sliced-{name}"
        info = write_hf_folder(sliced.model, sliced.architecture, folder)
        assert info["remote_code"] and "modeling_layerlab.py" in info["files"]
        assert "import engine" not in (folder / "modeling_layerlab.py").read_text()
        models[folder] = sliced.model
    for block in ("layer", "attention", "mlp"):
        models[tmp_path / f"dropped-{block}"] = _dropped_export(block, tmp_path / f"dropped-{block}")
    probe = windows(n=2, seed=5).input_ids
    for (folder, model), out in zip(models.items(), _reload_in_fresh_process(list(models), probe)):
        torch.testing.assert_close(out["logits"], logits(model, probe), rtol=1e-5, atol=1e-5, msg=folder.name)
        with torch.no_grad():
            ours = model.generate(probe[:, :4], max_new_tokens=3, do_sample=False)
        assert torch.equal(out["generated"], ours), folder.name  # generation with the KV cache works


def test_export_run_rebuilds_verifies_and_stores(store, tiny_loaded, tmp_path):
    sliced = run_slicing(store, tiny_loaded, SlicingPlan("constant", 0.25), CALIB, EVAL)
    result = export_run(store, tiny_loaded, sliced.record, "hf", tmp_path / "s")  # rebuilt from the record
    check = result["verification"]
    assert check["passed"] and abs(check["rel_diff"]) <= 0.005 and result["bytes"] > 0
    assert store.get_run(sliced.run_id).config["exports"][0]["folder"] == str(tmp_path / "s")
    dropped = run_dropping(store, tiny_loaded, DropPlan(block="layer", count=1, by="custom", custom=(2,)),
                           CALIB, EVAL)
    result = export_run(store, tiny_loaded, dropped.record, "hf", tmp_path / "d", model=dropped.model)
    assert result["verification"]["rel_diff"] == pytest.approx(0.0, abs=1e-6) and not result["remote_code"]
    half = export_run(store, tiny_loaded, dropped.record, "hf", tmp_path / "bf16", model=dropped.model,
                      dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "bf16" / "model.safetensors"), "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    weights_bytes = [(tmp_path / d / "model.safetensors").stat().st_size for d in ("d", "bf16")]
    assert weights_bytes[1] < 0.51 * weights_bytes[0] and half["dtype"] == "bfloat16"
    assert half["verification"]["rel_diff"] != 0.0 and half["verification"]["passed"]  # rounding measured
    with pytest.raises(ExportError, match="Hugging Face and compressed-tensors folders only"):
        check_export(tiny_loaded, dropped.record, "gguf", tmp_path / "g", overwrite=False, dtype="float16")
    from engine.runs.exports import export_estimate

    def seconds(text: str) -> float:  # "≈ 40 s" / "≈ 3 min"
        number, unit = text.removeprefix("≈ ").split()
        return float(number) * {"s": 1, "min": 60, "h": 3600}[unit]

    # a folder is written and read back at disk speed; a GGUF goes through transformers' slow GGUF loader
    folder, gguf = (seconds(export_estimate(tiny_loaded, dropped.record, fmt=f)) for f in ("hf", "gguf"))
    assert 0 < folder < gguf


def test_refusals_come_before_any_work(store, tiny_loaded, tmp_path):
    dropped = run_dropping(store, tiny_loaded, DropPlan(block="layer", count=1, by="custom", custom=(2,)),
                           CALIB, EVAL)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(FolderExistsError, match="overwrite"):
        check_export(tiny_loaded, dropped.record, "hf", tmp_path / "full", overwrite=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(ExportError, match="GGUF export is for quantized runs"):
        check_export(tiny_loaded, dropped.record, "gguf", tmp_path / "g", overwrite=False)
    other = LoadedModel.from_model(tiny_family_model("llama"))
    with pytest.raises(ExportError, match="load that model first"):
        check_export(other, dropped.record, "hf", tmp_path / "x", overwrite=False)
    quantized = run_quantization(store, tiny_loaded, QuantPlan(ordering="random"), CALIB, EVAL)
    assert export_formats(quantized.record)["hf"] and export_formats(quantized.record)["gguf"] is None


def test_a_failed_write_leaves_nothing(store, tiny_loaded, tmp_path, monkeypatch):
    dropped = run_dropping(store, tiny_loaded, DropPlan(block="attention", count=1, by="custom", custom=(1,)),
                           CALIB, EVAL)

    def disk_full(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine.export.hf_folder.save_file", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        export_run(store, tiny_loaded, dropped.record, "hf", tmp_path / "out")
    left = [p.name for p in tmp_path.iterdir() if not p.name.startswith("results.sqlite")]
    assert left == []  # neither the folder nor its staging copy
    assert "exports" not in store.get_run(dropped.run_id).config
