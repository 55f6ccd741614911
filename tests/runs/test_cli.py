"""The headless CLI: help, bad arguments, and a sweep that the Results page shows."""

from __future__ import annotations

import json

import pytest

from engine.cli import build_parser, main
from engine.runs.store import ResultsStore
from tests.apptest import open_app

TINY = ["--calib-windows", "2", "--calib-seqlen", "32", "--eval-windows", "2", "--eval-seqlen", "32"]


@pytest.mark.parametrize("command", ["score", "evaluate", "slice", "quantize", "sweep-slicing", "drop", "stack",
                                     "sweep-methods", "optimize-bits", "optimize-slicing",
                                     "sweep-quantization", "export"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--model" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["slice", "--target", "abc"], "invalid float value"),
    (["sweep-quantization", "--low-bits", "2,x"], "comma-separated integers"),
    (["quantize", "--ordering", "alphabetical"], "invalid choice"),
    (["bogus"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["slice", "--schedule", "dynamic", "--target", "0.1", "--basis", "0.3", *TINY], "basis"),
    (["quantize", "--low-bits", "1", *TINY], "Bit levels [1] are out of range"),
    (["evaluate", "--model", "/no/such/model"], "Could not find a model"),
    (["evaluate", "--eval-seqlen", "99999"], "longer than this model allows"),
    (["sweep-slicing", "--schedules", "wavy", *TINY], "--schedules"),
    (["quantize", "--runtime", "vllm", "--zero-point", "symmetric", "--group-size", "32", "--low-bits", "3", *TINY],
     "vLLM (compressed-tensors) does not run 3-bit weights (it takes 4, 8)"),
    (["optimize-bits", "--runtime", "vllm", "--avg-bits", "5", "--levels", "2,4,8", *TINY], "2-bit weights"),
])
def test_bad_inputs_exit_2_and_store_nothing(argv, message, capsys, tmp_path, tiny_folder):
    store_path = tmp_path / "cli.sqlite"
    model = [] if "--model" in argv else ["--model", tiny_folder]  # the tiny model: same checks, seconds faster
    assert main([*argv, *model, "--store", str(store_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("error: ") and message in err and "Traceback" not in err
    assert ResultsStore(store_path).runs() == []


@pytest.mark.slow
def test_cli_sweep_shows_up_in_results_page(capsys):
    before = len(ResultsStore().runs())
    argv = ["sweep-slicing", "--targets", "0.1", "--bases", "0", "--schedules", "constant", *TINY]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["kind"] for line in lines] == ["dense", "slicing"]
    assert lines[1]["ppl"] > lines[0]["ppl"] * 0.9
    assert len(ResultsStore().runs()) in (before + 1, before + 2)  # dense is reused when already on these windows
    at = open_app("results")
    at.selectbox(key="results_data").set_value("wiki-offline evaluation, 2 windows × 32 tokens").run()
    assert not at.exception
    table = next(d.value for d in at.dataframe if "run" in d.value.columns)  # not the interrupted-runs list
    assert {lines[0]["run"], lines[1]["run"]} <= set(table["run"])
    assert len(at.get("plotly_chart")) == 1


def test_parser_builds_all_commands():
    parser = build_parser()
    args = parser.parse_args(["sweep-quantization", "--low-bits", "2,3", "--low-fractions", "0,0.5"])
    assert args.low_bits == [2, 3] and args.low_fractions == [0.0, 0.5]


@pytest.mark.slow  # ~18 s
def test_drop_stack_and_sweep_methods_on_the_tiny_model(capsys, tmp_path, tiny_folder):
    store = ["--store", str(tmp_path / "cli.sqlite"), "--model", tiny_folder]
    assert main(["drop", "--blocks", "attention", "--count", "1", "--by", "attention", *TINY, *store]) == 0
    assert main(["stack", "--drop-layers", "1", "--quantize-bits", "4", *TINY, *store]) == 0
    out = tmp_path / "methods.json"
    assert main(["sweep-methods", "--sizes", "0.99", "--json", str(out), *TINY, *store]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["kind"] for line in lines[:2]] == ["dropping", "stacked"]
    assert "verdict" in lines[-1] and json.loads(out.read_text())["planned"]
    runs = ResultsStore(tmp_path / "cli.sqlite").runs()
    assert [r.method for r in runs].count("dense") == 1  # dense measured once for the same windows
    assert main(["drop", "--count", "9", *TINY, *store]) == 2  # more than the tiny model has


@pytest.mark.slow  # ~18 s
def test_export_command_writes_verifies_and_refuses(capsys, tmp_path, tiny_folder):
    store = ["--store", str(tmp_path / "cli.sqlite")]
    assert main(["quantize", "--group-size", "32", "--zero-point", "float", "--ordering", "random",
                 "--model", tiny_folder, *TINY, *store]) == 0
    run_id = json.loads(capsys.readouterr().out.splitlines()[-1])["run"]
    out = tmp_path / "gguf"
    assert main(["export", str(run_id), "--format", "gguf", "--out", str(out), "--verify-windows", "2", *store]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["verification"]["passed"] and (out / "model.gguf").stat().st_size == printed["bytes"]
    assert main(["export", str(run_id), "--format", "gguf", "--out", str(out), *store]) == 2  # exists
    assert "overwrite" in capsys.readouterr().err
    assert main(["export", str(run_id), "--format", "hf", "--out", str(tmp_path / "hf"), *store]) == 2
    assert "GGUF" in capsys.readouterr().err
    assert main(["export", str(run_id), "--format", "ct", "--out", str(tmp_path / "ct"), *store]) == 2
    assert "zero point 'integer' or 'symmetric'" in capsys.readouterr().err and not (tmp_path / "ct").exists()
    assert main(["export", "9999", "--format", "hf", "--out", str(tmp_path / "x"), *store]) == 2
    assert "no stored run 9999" in capsys.readouterr().err


@pytest.mark.skipif(not __import__("engine.llamacpp.runtime", fromlist=["status"]).status().available,
                    reason="llama.cpp is not built here (make llamacpp)")
def test_stack_in_llamacpp_types_then_export_as_gguf(capsys, tmp_path, tiny_folder):
    """Headless, the Dropping page's way to llama.cpp: drop whole layers and quantize in llama.cpp's types, then
    export the GGUF file (the size the run recorded; llama.cpp runs and checks it)."""
    store = ["--store", str(tmp_path / "cli.sqlite"), "--model", tiny_folder]
    assert main(["stack", "--drop-layers", "1", "--quantizer", "llama.cpp", "--runtime", "llama.cpp",
                 *TINY, *store]) == 0
    stacked = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert stacked["kind"] == "stacked" and "llama.cpp" in stacked["series"]
    out = tmp_path / "stack"
    assert main(["export", str(stacked["run"]), "--format", "gguf", "--out", str(out), "--verify-windows", "2",
                 *store]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["llamacpp"]["passed"] and (out / "model.gguf").stat().st_size == printed["bytes"]
    assert printed["bytes"] == ResultsStore(tmp_path / "cli.sqlite").get_run(stacked["run"]).metrics["bytes_16bit"]


def test_stack_for_vllm_then_export_as_compressed_tensors(capsys, tmp_path, tiny_folder):
    """Headless, the way to vLLM for a model without whole layers: the stack quantizes on vLLM's grid at a group
    size the checkpoint holds, and exports as the compressed-tensors folder it was sized as (vLLM's rules kept)."""
    store = ["--store", str(tmp_path / "cli.sqlite"), "--model", tiny_folder]
    assert main(["stack", "--drop-layers", "1", "--runtime", "vllm", *TINY, *store]) == 0
    stacked = json.loads(capsys.readouterr().out.splitlines()[-1])
    out = tmp_path / "stack"
    assert main(["export", str(stacked["run"]), "--format", "ct", "--out", str(out), "--verify-windows", "2",
                 "--dtype-out", "float16", *store]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert printed["vllm_problems"] == [] and printed["verification"]["passed"]
    record = ResultsStore(tmp_path / "cli.sqlite").get_run(stacked["run"])
    assert (out / "model.safetensors").stat().st_size == record.metrics["bytes_16bit"]
    assert record.config["stages"][1]["group_size"] == 32  # not given: the largest the tiny model's widths hold
    assert main(["export", str(stacked["run"]), "--format", "gguf", "--out", str(tmp_path / "g"), *store]) == 2
    assert "llama.cpp's types" in capsys.readouterr().err  # one clear line: what to re-run


def test_stack_for_a_runtime_takes_its_zero_point():
    """A stack made for a runtime quantizes on its default grid (vLLM: a zero point per group; transformers, which
    cannot load compressed-tensors zero points: symmetric); the page does the same."""
    from engine.cli import PLANS

    args = build_parser().parse_args(["stack", "--drop-layers", "1", "--runtime", "vllm", "--quantize-bits", "8",
                                      "--group-size", "64"])
    plan = PLANS["stack"](args)
    assert plan.then.zero_point == "integer" and plan.then.runtime == "vllm" and not plan.then.runtime_problems()
    assert plan.then.group_size == 64
    transformers = PLANS["stack"](build_parser().parse_args(["stack", "--drop-layers", "1", "--runtime",
                                                             "transformers", "--group-size", "64"]))
    assert transformers.then.zero_point == "symmetric" and not transformers.then.runtime_problems()
    research = PLANS["stack"](build_parser().parse_args(["stack", "--slice", "0.2"]))
    assert research.then.zero_point == "integer"
    quantize = build_parser().parse_args(["quantize", "--runtime", "transformers", "--group-size", "64"])
    assert PLANS["quantize"](quantize).zero_point == "symmetric"  # --zero-point not given: the runtime's default
    chosen = build_parser().parse_args(["quantize", "--runtime", "vllm", "--zero-point", "symmetric"])
    assert PLANS["quantize"](chosen).zero_point == "symmetric"


def test_group_size_not_given_fits_the_runtime_and_zero_means_one_scale_per_row(tiny_loaded):
    from engine.cli.commands import group_size
    from engine.quant.runtimes import RUNTIMES

    assert group_size(None, tiny_loaded, RUNTIMES["vllm"]) == 32  # widths 64 and 96
    assert group_size(None, tiny_loaded, RUNTIMES["research"]) == 128
    assert group_size(0, tiny_loaded, RUNTIMES["vllm"]) is None and group_size(64, tiny_loaded, RUNTIMES["vllm"]) == 64
