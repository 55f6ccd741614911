"""AppTest of the Quantization page: bit map preview, refusals, preview run and its chart."""

from __future__ import annotations

import json

import pytest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, use_small_data


def _bits_caption(at) -> str:
    return next(c.value for c in at.caption if c.value.startswith("Average"))


def _ready():
    at = use_small_data(open_app("quantization"))
    if any(b.label.startswith("Compute LR scores") for b in at.button):  # not cached by another test
        click(at, "Compute LR scores")
    assert not at.exception and not at.error, at.error
    return at


def test_bit_map_follows_the_sliders_and_bad_levels_are_refused(tiny_app):
    at = _ready()
    assert "Per-layer bit allocation" in at.get("plotly_chart")[0].proto.spec
    assert _bits_caption(at).startswith("Average 3.500 code bits")  # 25% of 4 layers -> 1 at 2 bits
    at.slider(key="keep.quant_fraction").set_value(50).run()
    assert _bits_caption(at).startswith("Average 3.000 code bits")
    assert "of the dense model at 16 bits" in _bits_caption(at)
    at.radio(key="keep.quant_mode").set_value("average").run()
    assert _bits_caption(at).startswith("Average 3.000")  # 3.25 target rounds down to 2 of 4 layers at 2 bits
    at.select_slider(key="keep.quant_low").set_value(6).run()  # low above high
    assert not at.exception
    assert "must not exceed the high level" in at.error[0].value or "unreachable" in at.error[0].value


def test_preview_run_is_stored_marked_and_charted(tiny_app):
    at = _ready()
    at.select_slider(key="keep.quant_low").set_value(3).run()
    click(at, "Preview")
    assert not at.exception and not at.error, at.error
    assert at.metric[0].label == "Perplexity" and float(at.metric[0].value) > 1
    labels = {m.label: m.value for m in at.metric}  # each KL statistic in its own tile: none cut short
    assert {"KLD median", "KLD 99th percentile"} <= set(labels) and float(labels["KLD 99th percentile"]) >= float(
        labels["KLD median"]) >= 0
    assert any("Preview on 2 windows" in w.value for w in at.warning)
    run = ResultsStore().runs()[0]
    assert run.is_preview and run.metrics["dense_ppl"] > 1
    specs = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("(preview)" in spec and "perplexity vs size" in spec for spec in specs)
    # a trial saw "Stay on this page until it finishes" and a full bar left on the page after the run had ended
    assert not any("Stay on this page" in c.value for c in at.caption) and not at.get("progress")


@pytest.mark.slow
def test_builtin_bit_map_counts_layers():
    at = use_small_data(open_app("quantization"))
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    assert _bits_caption(at).startswith("Average 3.467 code bits")  # 25% of 30 layers -> 8 at 2 bits


def test_optimize_for_budget_refuses_bad_budgets_then_optimizes_and_runs(tiny_app):
    at = use_small_data(open_app("quantization"), windows=4, seqlen=32)
    at.radio(key="keep.quant_choose").set_value("optimizer").run()
    at.number_input(key="keep.opt_avg_bits").set_value(2.0).run()  # below 2 bits + group scales
    assert any("below the smallest" in e.value and "bits per weight" in e.value for e in at.error)
    at.multiselect(key="keep.opt_levels").set_value([]).run()
    assert any("at least one bit level" in e.value for e in at.error)
    at.multiselect(key="keep.opt_levels").set_value([2, 3, 4, 8])
    at.number_input(key="keep.opt_avg_bits").set_value(3.5)
    at.slider(key="keep.opt_candidates").set_value(2)
    at.number_input(key="keep.opt_held_out").set_value(2).run()
    click(at, "Optimize for budget")
    assert not at.exception and not at.error, at.error
    summary = next(m.value for m in at.markdown if m.value.startswith("Chosen:"))
    assert "held-out perplexity" in summary and "from window 4" in summary
    spec = next(c.proto.spec for c in at.get("plotly_chart") if "predicted vs measured" in c.proto.spec)
    assert "star" in spec
    click(at, "Run the optimizer")
    assert not at.exception and not at.error, at.error
    series = {r.series for r in ResultsStore().runs(method="quantization")}
    assert any(s.startswith("optimizer") for s in series) and any(s.startswith("lim") for s in series)


def test_optimize_per_linear_draws_the_layers_by_linears_map(tiny_app):
    at = use_small_data(open_app("quantization"), windows=4, seqlen=32)
    at.radio(key="keep.quant_choose").set_value("optimizer").run()
    at.multiselect(key="keep.opt_levels").set_value([2, 4])
    at.slider(key="keep.opt_candidates").set_value(2)
    at.number_input(key="keep.opt_held_out").set_value(2)
    at.radio(key="keep.opt_granularity").set_value("module").run()
    assert not at.error, at.error
    click(at, "Optimize for budget")
    assert not at.exception and not at.error, at.error
    spec = next(c.proto.spec for c in at.get("plotly_chart") if "Bit allocation per linear" in c.proto.spec)
    figure = json.loads(spec)
    heat = figure["data"][0]
    assert heat["type"] == "heatmap" and heat["y"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert {v for row in heat["z"] for v in row} <= {2, 4}


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_llamacpp_types_show_their_file_then_run_and_export_verified_by_llamacpp(tiny_app, tmp_path):
    at = _ready()
    at.selectbox(key="keep.quant_method").set_value("llama.cpp").run()
    assert not at.exception and not at.error, at.error
    labels = [w.label for w in at.select_slider]
    assert labels == ["High bits", "Low bits"] and "Group size" not in [s.label for s in at.selectbox]
    caption = _bits_caption(at)
    assert "GGUF file" in caption and "(= the exported file's bytes)" in caption
    assert "Q4_0 (for Q2_K)" in caption  # the tiny model's 64-wide rows fall back as llama.cpp's do
    at.select_slider(key="keep.quant_low_ggml_k-quants").set_value(3).run()
    assert "Q4_0 (for Q3_K)" in _bits_caption(at)
    at.selectbox(key="keep.quant_ggml_types").set_value("legacy").run()
    assert not at.exception
    assert at.select_slider(key="keep.quant_high_ggml_legacy").options == ["4 (Q4_0)", "5 (Q5_0)", "8 (Q8_0)"]
    at.selectbox(key="keep.quant_ggml_types").set_value("k-quants").run()
    click(at, "Preview")
    assert not at.exception and not at.error, at.error
    run = ResultsStore().runs()[0]
    assert run.config["runtime"] == "llama.cpp (GGUF)" and run.metrics["bytes_16bit"] == run.config["file_bytes"]
    assert "llama.cpp k-quants" in run.series
    at.text_input(key=f"quantization_export_folder_{run.id}_gguf").set_value(str(tmp_path / "e")).run()
    click(at, "Export and verify")
    assert not at.exception and not at.error, at.error
    assert any("llama.cpp ran the file" in s.value for s in at.success)
    export = ResultsStore().get_run(run.id).config["exports"][0]
    assert export["bytes"] == run.config["file_bytes"]  # the size the run showed is the file's
    assert abs(export["llamacpp"]["ppl_gap"]) < 0.005


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_optimizer_under_llamacpp_types_budgets_the_gguf_file_and_refuses_other_type_sets(tiny_app):
    at = _ready()
    at.selectbox(key="keep.quant_method").set_value("llama.cpp").run()
    at.radio(key="keep.quant_choose").set_value("optimizer").run()
    assert not at.exception
    # the tiny model's 64-wide rows fall back to Q4_0 and up: 3.5 bits per weight cannot be reached, and it says so
    assert "choose 4.500–8.500 bits per weight" in at.error[0].value
    at.number_input(key="keep.opt_avg_bits").set_value(5.0)
    at.number_input(key="keep.calib_windows").set_value(8).run()  # the optimizer's interval needs 4 or more
    assert not at.exception and not at.error, at.error
    assert any("Sizes are the GGUF file's bytes" in m.value for e in at.expander for m in e.markdown)
    assert at.multiselect(key="keep.opt_levels_llamacpp").options == ["2 (Q2_K)", "3 (Q3_K)", "4 (Q4_K)", "5 (Q5_K)",
                                                                        "6 (Q6_K)", "8 (Q8_0)"] or \
        at.multiselect(key="keep.opt_levels_llamacpp").options == ["2", "3", "4", "5", "6", "8"]
    at.selectbox(key="keep.quant_ggml_types").set_value("legacy").run()
    assert any("choose the k-quants type set" in i.value for i in at.info)


def test_the_sidebar_runtime_narrows_every_choice_and_runs_record_it(tiny_app):
    at = _ready()
    at.selectbox(key="keep.runtime").set_value("vllm").run()
    assert not at.exception and not at.error, at.error
    assert any("Target runtime: **vLLM (compressed-tensors)**" in i.value for i in at.info)
    assert [o for o in at.selectbox(key="keep.quant_method_vllm").options] == ["round-to-nearest",
                                                                               "GPTQ (calibrated)"]
    assert list(at.select_slider(key="keep.quant_high_vllm").options) == ["4", "8"]
    assert list(at.radio(key="keep.quant_zero_vllm").options) == ["integer", "symmetric"]
    assert (at.select_slider(key="keep.quant_high_vllm").value, at.select_slider(key="keep.quant_low_vllm").value) == (
        8, 4)  # a mix of vLLM's two levels to start from, not 4/4
    # only group sizes the checkpoint can hold for this model (its widths are 64 and 96)
    assert list(at.selectbox(key="keep.quant_group_vllm").options) == ["32"]
    click(at, "Preview")
    assert not at.exception and not at.error, [e.value for e in at.error]
    stored = ResultsStore().runs(method="quantization")
    run = stored[0]
    assert run.config["target_runtime"] == "vllm" and run.series.endswith("for vLLM (compressed-tensors)")
    assert run.config["zero_point"] == "integer"  # vLLM's default grid: a zero point per group
    at.selectbox(key="keep.runtime").set_value("llama.cpp").run()  # switching keeps every stored run
    assert [o for o in at.selectbox(key="keep.quant_method_llama.cpp").options] == ["llama.cpp types (exact GGUF)"]
    assert len(ResultsStore().runs(method="quantization")) == len(stored)


def test_the_optimizer_opens_on_a_budget_the_runtime_levels_can_meet(tiny_app):
    """Under vLLM (levels 4 and 8) a trial's optimizer opened on 3.5 bits per weight, below what 4-bit weights
    cost, so the first thing it showed was an error: it now starts halfway between the levels."""
    from ui.optimizer_panels import default_avg_bits

    assert default_avg_bits([2, 3, 4, 5, 6, 8]) == 3.5 and default_avg_bits([4, 8]) == 6.0
    at = _ready()
    at.selectbox(key="keep.runtime").set_value("vllm").run()
    at.radio(key="keep.quant_choose").set_value("optimizer")
    at.number_input(key="keep.calib_windows").set_value(8).run()  # the optimizer's interval needs 4 or more
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert at.number_input(key="keep.opt_avg_bits_vllm").value == 6.0
