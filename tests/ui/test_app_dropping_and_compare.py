"""AppTests of the Dropping and Compare pages (tiny model)."""

from __future__ import annotations

import re

import plotly.io
import pytest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, plotly_values, use_small_data


def _ready(page: str):
    at = use_small_data(open_app(page), windows=2, seqlen=40)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    assert not at.exception and not at.error, at.error
    return at


@pytest.mark.slow  # ~5 s
def test_dropping_preview_refusals_and_run(tiny_app):
    at = _ready("dropping")
    assert "Which layers go" in at.get("plotly_chart")[0].proto.spec
    at.slider(key="keep.drop_count").set_value(3).run()  # 4 layers, first and last protected: only 2 can go
    assert "Only 2 layers can be dropped" in at.error[0].value
    at.slider(key="keep.drop_count").set_value(1).run()
    at.radio(key="keep.drop_block").set_value("attention").run()
    click(at, "Run dropping")
    assert not at.exception and not at.error, at.error
    run = ResultsStore().runs()[0]
    assert run.method == "dropping" and run.config["block"] == "attention" and run.metrics["param_fraction"] < 1
    assert any("perplexity vs size" in c.proto.spec for c in at.get("plotly_chart"))


def test_compare_page_plans_a_sweep_and_draws_every_method(tiny_app):
    at = _ready("compare")
    at.text_input(key="keep.cmp_sizes").set_value("0.5, x").run()
    assert "is not a size" in at.error[0].value
    at.text_input(key="keep.cmp_sizes").set_value("0.99").run()  # the tiny model is mostly its embedding
    planned = next(c.value for c in at.caption if c.value.startswith("Planned:"))
    assert "dropping" in planned and "quantization" in planned
    assert " dropped)" in planned and " of layers at " in planned  # each point says its setting, not only its series
    sweep = next(b.label for b in at.button if b.label.startswith("Run the sweep"))
    assert re.search(r"\(\d+ runs, ≈ [\d.]+ (s|min)", sweep), sweep  # how long, before it starts
    click(at, "Run the sweep")
    assert not at.exception and not at.error, at.error
    names = {t.name for t in plotly.io.from_json(at.get("plotly_chart")[0].proto.spec).data}
    assert {"drop layers by lr", "quantization · lim 8/6-bit rtn"} <= names
    said = " ".join(m.value for m in at.markdown)
    assert "quantization beats dropping" in said and "Dense model: perplexity" in said


def test_compare_page_stacks_drop_then_quantize(tiny_app):
    at = _ready("compare")
    at.radio(key="keep.stack_first").set_value("drop layers").run()
    at.slider(key="keep.stack_drop").set_value(1).run()
    assert re.search(r"Run the stack \(≈ [\d.]+ (s|min)\)", next(b.label for b in at.button
                                                                 if b.label.startswith("Run the stack")))
    click(at, "Run the stack")
    assert not at.exception and not at.error, at.error
    run = ResultsStore().runs(method="stacked")[0]
    assert [stage["method"] for stage in run.config["stages"]] == ["dropping", "quantization"]


def test_dropping_by_measured_sensitivity_iteratively(tiny_app):
    at = _ready("dropping")
    at.selectbox(key="keep.drop_by").set_value("sensitivity").run()
    assert "too few" in at.error[0].value  # 2 calibration windows: the sensitivity lab needs 4
    at = use_small_data(at, windows=4, seqlen=40)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    click(at, "Compute the sensitivity ranking")
    assert not at.exception and not at.error, at.error
    fig = plotly.io.from_json(at.get("plotly_chart")[0].proto.spec)
    assert "cheaper to drop" in fig.layout.title.text and fig.data[0].y is not None
    assert all(v >= 0 for trace in fig.data for v in plotly_values(trace.y))  # KL is never negative
    at.toggle(key="keep.drop_iterative").set_value(True).run()
    click(at, "Compute the sensitivity ranking (")  # the second ranking runs on the model without the first pick
    assert not at.exception and not at.error, at.error
    assert any("chosen iteratively" in c.value for c in at.caption)
    click(at, "Run dropping")
    assert not at.exception and not at.error, at.error
    run = ResultsStore().runs(method="dropping")[0]
    assert run.config["iterative"] and run.config["by"] == "sensitivity"


def test_compare_page_plans_only_what_the_target_runtime_runs(tiny_app):
    at = _ready("compare")
    at.selectbox(key="keep.runtime").set_value("vllm").run()
    at.text_input(key="keep.cmp_sizes").set_value("0.99, 0.9").run()
    planned = next(c.value for c in at.caption if c.value.startswith("Planned:"))
    assert "quantization lim 8/4-bit rtn for vLLM (compressed-tensors)" in planned, planned
    assert not re.search(r"lim (8/6|6/4|4/3|4/2|3/2)-bit", planned)
    assert list(at.select_slider(key="keep.stack_high_vllm").options) == ["4", "8"]


def test_slicing_and_dropping_pages_say_where_their_models_run_for_the_chosen_runtime(tiny_app):
    at = open_app("slicing")
    assert not any("sliced model" in i.value for i in at.info)  # the research grid: nothing to say
    at.selectbox(key="keep.runtime").set_value("vllm").run()
    assert any("vLLM (compressed-tensors) cannot run a sliced model" in i.value for i in at.info)
    at.switch_page("pages/dropping.py").run()
    at.selectbox(key="keep.runtime").set_value("llama.cpp").run()
    assert any("convert_hf_to_gguf.py" in i.value for i in at.info)
    at.radio(key="keep.drop_block").set_value("attention").run()
    assert any("llama.cpp (GGUF) does not" in i.value for i in at.info), [i.value for i in at.info]
    assert not at.exception


def _stack_then_results(runtime: str):
    """Compare methods with ``runtime`` as the target: drop one layer, then quantize (the stack); then the Results
    page with that run chosen for export.  Returns the page and the stored run."""
    at = _ready("compare")
    at.selectbox(key="keep.runtime").set_value(runtime).run()
    at.radio(key="keep.stack_first").set_value("drop layers").run()
    at.slider(key="keep.stack_drop").set_value(1).run()
    click(at, "Run the stack")
    assert not at.exception and not at.error, at.error
    run = ResultsStore().runs(method="stacked")[0]
    at.switch_page("pages/results.py").run()
    at.selectbox(key=f"results_export_run_{ResultsStore().runs()[0].id}").set_value(run.id).run()
    return at, run


def _export(at, run, fmt: str, folder) -> dict:
    """Export ``run`` as ``fmt`` into ``folder`` from the Results page; the export stored with the run."""
    at.text_input(key=f"results_export_folder_{run.id}_{fmt}").set_value(str(folder)).run()
    click(at, "Export and verify")
    assert not at.exception and not at.error, at.error
    return ResultsStore().get_run(run.id).config["exports"][0]


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_a_stack_for_llamacpp_exports_its_gguf_file_from_the_results_page(tiny_app, tmp_path):
    """The Dropping page's way to llama.cpp: drop whole layers, then quantize in llama.cpp's types in one stack;
    the Results page exports it as the GGUF file llama.cpp then runs."""
    at, run = _stack_then_results("llama.cpp")
    assert run.config["target_runtime"] == "llama.cpp"
    assert at.radio(key="results_export_format").value == "gguf"
    assert any("only GGUF stores" in c.value for c in at.caption)  # why no compressed-tensors folder
    assert any("Tensor types in the file" in m.value for m in at.markdown)
    export = _export(at, run, "gguf", tmp_path / "stack")
    assert any("llama.cpp ran the file" in s.value for s in at.success)
    assert export["bytes"] == run.metrics["bytes_16bit"]


@pytest.mark.slow  # ~10 s
def test_a_stack_for_vllm_exports_its_checkpoint_from_the_results_page(tiny_app, tmp_path):
    """With vLLM as the target, the stack quantizes on vLLM's grid and exports as the compressed-tensors folder
    vLLM loads (its rules checked), sized as the run showed it; GGUF says what to re-run."""
    at, run = _stack_then_results("vllm")
    assert run.config["target_runtime"] == "vllm" and run.config["runs_in"] == "vLLM (compressed-tensors)"
    assert at.radio(key="results_export_format").value == "ct"
    assert any("re-run the stack with llama.cpp's types" in c.value for c in at.caption)  # why no GGUF file
    assert run.config["stages"][1]["quantizer_spec"]["zero_point"] == "integer"  # vLLM's default grid
    assert any("asymmetric" in c.value and "compressed-tensors' own decompressor" in c.value for c in at.caption)
    export = _export(at, run, "ct", tmp_path / "stack")
    assert export["vllm_problems"] == [] and export["verification"]["passed"]
