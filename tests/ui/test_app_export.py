"""AppTests of the export controls (tiny model): format choice, refusals, export with verification, stored result."""

from __future__ import annotations

import pytest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, use_small_data


def _new_run(before: set[int], method: str):
    """The one run of ``method`` stored since ``before`` (ids) was taken."""
    (run,) = [r for r in ResultsStore().runs(method=method) if r.id not in before]
    return run


def _quantization_preview(zero_point: str):
    """The Quantization page after a random-order preview with group 32 and ``zero_point``; (app, stored run)."""
    at = use_small_data(open_app("quantization"), windows=2, seqlen=40)
    at.selectbox(key="keep.quant_order").set_value("random")
    at.selectbox(key="keep.quant_group").set_value(32)
    at.radio(key="keep.quant_zero").set_value(zero_point).run()
    before = {r.id for r in ResultsStore().runs()}
    click(at, "Preview")
    assert not at.exception and not at.error, at.error
    return at, _new_run(before, "quantization")


def test_dropping_page_exports_a_run_and_refuses_a_full_folder(tiny_app, tmp_path):
    at = use_small_data(open_app("dropping"), windows=2, seqlen=40)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    at.slider(key="keep.drop_count").set_value(1).run()
    before = {r.id for r in ResultsStore().runs()}
    click(at, "Run dropping")
    run = _new_run(before, "dropping")
    assert (len(at.radio(key="dropping_export_format").options) == 1
            and at.radio(key="dropping_export_format").value == "hf")
    assert any("GGUF export is for quantized runs" in c.value for c in at.caption)
    folder = at.text_input(key=f"dropping_export_folder_{run.id}_hf")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("keep me")
    folder.set_value(str(tmp_path / "full")).run()
    click(at, "Export and verify")
    assert "already exists and is not empty" in at.error[0].value and not at.exception
    assert (tmp_path / "full" / "mine.txt").read_text() == "keep me"
    at.text_input(key=f"dropping_export_folder_{run.id}_hf").set_value(str(tmp_path / "out")).run()
    click(at, "Export and verify")
    assert not at.exception and not at.error, at.error
    assert "Exported to" in at.success[-1].value and "within ±0.5%" in at.success[-1].value
    # the run's size counts the weights; the folder also holds the tokenizer (a trial read 435.9 for 404.0 MiB)
    said = at.success[-1].value
    assert "MiB of weights; " in said and "on disk with the tokenizer and config" in said
    assert any(b.label.startswith("Download out.zip") for b in at.get("download_button"))
    exports = ResultsStore().get_run(run.id).config["exports"]
    assert len(exports) == 1 and exports[0]["verification"]["passed"] and (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow  # ~14 s (reads the tokenizer back from GGUF twice)
def test_quantization_export_lists_gguf_types(tiny_app, tmp_path):
    at, run = _quantization_preview("float")
    assert at.selectbox(key=f"quantization_export_run_{run.id}").value == run.id  # the run just made
    assert at.radio(key="quantization_export_format").value == "gguf"
    assert any("zero point 'integer' or 'symmetric'" in c.value for c in at.caption)  # why no compressed-tensors
    types = next(m.value for m in at.markdown if "Tensor types in the file" in m.value)
    assert "2-bit → Q4_1 (exact)" in types and "codes, scales and minimums copied" in types
    at.radio(key="quantization_export_types").set_value("compact").run()
    compact = next(m.value for m in at.markdown if "Tensor types in the file" in m.value)
    assert "2-bit → Q4_1:" in compact and "re-quantized" in compact  # hidden 64: no k-quant fits
    at.text_input(key=f"quantization_export_folder_{run.id}_gguf").set_value(str(tmp_path / "g")).run()
    click(at, "Export and verify")
    assert not at.exception and not at.error, at.error
    assert (tmp_path / "g" / "model.gguf").exists() and "Exported to" in at.success[-1].value
    assert "no promise: re-quantized tensors" in at.success[-1].value
    assert ResultsStore().get_run(run.id).config["exports"][0]["type_choice"] == "compact"


def test_symmetric_quantization_exports_as_compressed_tensors(tiny_app, tmp_path):
    at, run = _quantization_preview("symmetric")
    assert run.config["quantizer_spec"]["zero_point"] == "symmetric"
    formats = at.radio(key="quantization_export_format")
    assert len(formats.options) == 2 and "compressed-tensors" in formats.options[1]
    formats.set_value("ct").run()
    assert any("pack-quantized" in c.value and "No remote code" in c.value for c in at.caption)
    at.text_input(key=f"quantization_export_folder_{run.id}_ct").set_value(str(tmp_path / "ct")).run()
    click(at, "Export and verify")
    assert not at.exception and not at.error, at.error
    assert "within ±0.5%" in at.success[-1].value and (tmp_path / "ct" / "model.safetensors").exists()
    assert ResultsStore().get_run(run.id).config["exports"][0]["format"] == "ct"
