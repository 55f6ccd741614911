"""llama.cpp's types in the engine: bit-exact with llama.cpp and gguf, exact files and sizes, llama.cpp in the loop.

Skipped (with the reason) where llama.cpp is not built on the machine: ``make llamacpp`` builds it.
"""

from __future__ import annotations

import subprocess

import gguf
import numpy as np
import pytest
import torch

from engine.core.data import DataSpec, token_windows
from engine.export.gguf_file import _permute_rows
from engine.export.gguf_llamacpp import gguf_file_bytes, layout, llamacpp_details, write_llamacpp_gguf
from engine.export.hf_folder import ExportError
from engine.llamacpp.runtime import status
from engine.quant.ggml_types import TypeChoiceError, output_type, type_for_level
from engine.quant.grid import QuantizationError, QuantizerSpec
from engine.quant.quantize_model import quantize_model

needs_llamacpp = pytest.mark.skipif(not status().available, reason=f"llama.cpp: {status().reason}")
TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS")


def _weights(rows: int = 48, cols: int = 512) -> np.ndarray:
    generator = np.random.default_rng(0)
    w = generator.standard_normal((rows, cols)).astype(np.float32) * 0.02
    w[3, 17] = 0.9  # an outlier, as real layers have
    return w


def test_levels_map_to_llamacpp_types_with_its_fallbacks():
    assert type_for_level(4, 1536).qtype == "Q4_K"
    # rows that are not a multiple of 256 (SmolLM2's 576, Gemma-3's 640) get llama.cpp's fallback types
    assert [type_for_level(b, 576).qtype for b in (2, 3, 4, 5, 6, 8)] == ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0",
                                                                          "Q8_0"]
    assert type_for_level(4, 576).label() == "Q5_0 (for Q4_K)"
    assert type_for_level(4, 40).qtype == "F16"  # not even a multiple of 32
    assert type_for_level(4, 576, "legacy+min").qtype == "Q4_1"
    assert output_type(576).qtype == "Q8_0" and output_type(1024).qtype == "Q6_K"
    with pytest.raises(TypeChoiceError, match="no 3-bit type; choose one of 4 \\(Q4_0\\)"):
        type_for_level(3, 512, "legacy")


def test_specs_refuse_levels_the_type_set_lacks():
    with pytest.raises(QuantizationError, match="no 7-bit type; choose one of 2, 3, 4, 5, 6, 8"):
        QuantizerSpec(method="llama.cpp", bits=7)
    spec = QuantizerSpec(method="llama.cpp", bits=4, imatrix=True)
    assert spec.needs_calibration and "imatrix" in spec.label()
    assert "ggml_types" not in QuantizerSpec().to_dict()  # research-grid cache keys are unchanged


@needs_llamacpp
@pytest.mark.parametrize("qtype", TYPES)
def test_llamacpp_dequantization_equals_gguf_bit_for_bit(qtype):
    from engine.llamacpp import ggml

    w = _weights()
    blocks = ggml.quantize(w, qtype)
    ours = ggml.dequantize(blocks, qtype, w.shape[1])
    theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype]).reshape(w.shape)
    assert np.array_equal(ours, theirs)
    assert blocks.shape == (w.shape[0], w.shape[1] // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]
                            * gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1])
    assert 0 < float(((ours - w) ** 2).mean()) < float((w ** 2).mean()) / 4  # a real quantization, not a copy


@needs_llamacpp
@pytest.mark.parametrize("qtype", ("Q4_K", "Q3_K", "Q5_0", "IQ4_NL"))
def test_an_imatrix_lowers_the_importance_weighted_error(qtype):
    from engine.llamacpp import ggml

    w = _weights(64, 512)
    importance = np.exp(np.random.default_rng(1).standard_normal(512) * 2).astype(np.float32)  # uneven columns

    def weighted_error(blocks: np.ndarray) -> float:
        return float((((ggml.dequantize(blocks, qtype, 512) - w) ** 2) * importance).sum())

    assert weighted_error(ggml.quantize(w, qtype, importance)) < weighted_error(ggml.quantize(w, qtype))


@needs_llamacpp
def test_tiny_model_run_exports_the_bytes_it_measured(tiny_loaded, tmp_path):
    spec = QuantizerSpec(method="llama.cpp", bits=4)
    bits = (8, {"q": 2, "k": 3, "v": 4, "o": 5, "gate": 6, "up": 8, "down": 4}, 5, 4)
    quantized = quantize_model(tiny_loaded, bits, spec=spec, use_cache=False)
    info = write_llamacpp_gguf(quantized, tiny_loaded, tmp_path / "g")
    assert info["bytes"] == gguf_file_bytes(tiny_loaded, spec, quantized.bits)  # the size shown is the file's
    reader = gguf.GGUFReader(info["file"])
    tensors = {t.name: t for t in reader.tensors}
    config = tiny_loaded.model.config
    entries, _ = layout(tiny_loaded, spec, quantized.bits)
    linears = [e for e in entries if e.role == "linear"]
    assert len(linears) == 28
    for entry in linears:
        stored = tensors[entry.name]
        assert stored.tensor_type.name == entry.qtype
        from_file = gguf.quants.dequantize(np.asarray(stored.data), stored.tensor_type).reshape(entry.rows, entry.cols)
        in_app = quantized.weights[entry.layer][entry.linear].dequantize().numpy()
        if entry.linear in ("q", "k"):  # llama.cpp's row order for Llama q/k
            in_app = _permute_rows(in_app, config.num_attention_heads if entry.linear == "q"
                                   else config.num_key_value_heads)
        assert np.array_equal(from_file, in_app), entry.name
    # the in-app model computes with exactly those weights, and with the output type's embedding
    embedding = quantized.model.get_input_embeddings().weight
    token_embd = tensors["token_embd.weight"]
    assert token_embd.tensor_type.name == "Q8_0"
    assert torch.equal(embedding, torch.from_numpy(gguf.quants.dequantize(
        np.asarray(token_embd.data), token_embd.tensor_type).reshape(embedding.shape)))
    details = llamacpp_details(tiny_loaded, spec, quantized.bits)
    assert details["tensor_types"]["Q4_0 (for Q2_K)"] == 1 and details["file_bytes"] == info["bytes"]


def test_research_grid_runs_are_not_exported_as_exact(tiny_loaded):
    with pytest.raises(ExportError, match="research grid.*llama.cpp quantizer"):
        layout(tiny_loaded, QuantizerSpec(bits=4), (4,) * 4)


@needs_llamacpp
def test_llamacpp_runs_the_exported_file_as_the_app_does(tiny_loaded, tmp_path):
    from engine.llamacpp.agreement import agreement

    quantized = quantize_model(tiny_loaded, [4, 2, 8, 5], spec=QuantizerSpec(method="llama.cpp", bits=4),
                               use_cache=False)
    info = write_llamacpp_gguf(quantized, tiny_loaded, tmp_path / "g")
    windows = token_windows(DataSpec(seqlen=64, n_windows=2), tiny_loaded.tokenizer)
    result = agreement(quantized.model, info["file"], windows)
    assert result.n_tokens == 2 * 63
    assert abs(result.ppl_gap) < 0.005 and result.kld_mean < 0.005


@needs_llamacpp
def test_llama_quantize_reads_layerlab_imatrix_file(tiny_loaded, tmp_path):
    from engine.llamacpp.runtime import tool
    from engine.quant.imatrix import collect_importance, write_imatrix_gguf

    quantized = quantize_model(tiny_loaded, [8] * 4, spec=QuantizerSpec(method="llama.cpp", bits=8), use_cache=False)
    info = write_llamacpp_gguf(quantized, tiny_loaded, tmp_path / "g")
    windows = token_windows(DataSpec(split="calibration", seqlen=64, n_windows=2), tiny_loaded.tokenizer)
    importance = collect_importance(tiny_loaded, windows)
    entries, _ = layout(tiny_loaded, QuantizerSpec(method="llama.cpp", bits=8), quantized.bits)
    names = {(e.layer, e.linear): e.name for e in entries if e.role == "linear"}
    imatrix = write_imatrix_gguf(importance, names, tmp_path / "imatrix.gguf", chunk_size=64)
    assert importance.count == 128 and torch.all(importance.mean(0, "q") > 0)
    done = subprocess.run([str(tool("llama-quantize")), "--allow-requantize", "--imatrix", str(imatrix), info["file"],
                           str(tmp_path / "q4.gguf"), "Q4_0"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "imatrix" in (done.stdout + done.stderr).lower()
    assert (tmp_path / "q4.gguf").stat().st_size < (tmp_path / "g" / "model.gguf").stat().st_size


def test_llamacpp_runs_are_saved_as_gguf_not_as_codes(tiny_loaded, tmp_path):
    from engine.core.data import DataSpec as Spec
    from engine.runs.plans import EvalPlan, QuantPlan
    from engine.runs.runner import run_quantization
    from engine.runs.store import ResultsStore

    with pytest.raises(ValueError, match="saved as its GGUF file"):
        run_quantization(ResultsStore(tmp_path / "s.sqlite"), tiny_loaded, QuantPlan("llama.cpp", high_bits=4),
                         Spec(split="calibration", seqlen=32, n_windows=2),
                         EvalPlan(Spec(split="evaluation", seqlen=32, n_windows=2)), save_to=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_unavailable_llamacpp_is_a_value_error_the_pages_show():
    from engine.llamacpp.runtime import LlamaCppUnavailable

    assert issubclass(LlamaCppUnavailable, ValueError)


@needs_llamacpp
def test_a_stack_that_drops_then_quantizes_in_llamacpp_types_is_sized_by_its_gguf_file(store, tiny_loaded):
    from engine.core.models import LoadedModel
    from engine.dropping.drop_model import drop_model
    from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, StackPlan
    from engine.runs.runner import run

    plan = StackPlan(DropPlan("layer", 1, "custom", custom=(1,)), QuantPlan("llama.cpp", high_bits=8, low_bits=8,
                                                                         low_fraction=0.0))
    record = run(store, tiny_loaded, plan, DataSpec(seqlen=32, n_windows=2),
                 EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))).record
    middle = LoadedModel.from_model(drop_model(tiny_loaded, "layer", [1]).model, tiny_loaded.tokenizer,
                                    source=f"{tiny_loaded.source} ({plan.first.series()})")  # its name is in the file
    spec = QuantizerSpec(method="llama.cpp", bits=8)
    assert record.metrics["bytes_16bit"] == gguf_file_bytes(middle, spec, (8,) * middle.num_layers)
    with_imatrix = StackPlan(plan.first, QuantPlan("llama.cpp", high_bits=4, low_bits=4, low_fraction=0.0,
                                                   imatrix=True))  # quantized with the calibration text's imatrix
    assert run(store, tiny_loaded, with_imatrix, DataSpec(seqlen=32, n_windows=2),
               EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))).record.metrics["kld_mean"] is not None


@needs_llamacpp
def test_a_stack_that_drops_then_quantizes_in_llamacpp_types_exports_the_file_it_was_sized_by(store, tiny_loaded,
                                                                                           tmp_path):
    """The path to llama.cpp for a model without whole layers: the stack's GGUF file has one block fewer, is the
    size the run showed, and llama.cpp runs it as the app did; other stacks say what would export."""
    from engine.runs.exports import export_formats, export_run, gguf_type_lines
    from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, StackPlan
    from engine.runs.runner import run

    drop = DropPlan("layer", 1, "custom", custom=(2,))
    evaluation = EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))
    plan = StackPlan(drop, QuantPlan("llama.cpp", high_bits=8, low_bits=4, low_fraction=0.5, runtime="llama.cpp"))
    record = run(store, tiny_loaded, plan, DataSpec(seqlen=32, n_windows=2), evaluation).record
    assert record.config["target_runtime"] == "llama.cpp" and export_formats(record, tiny_loaded)["gguf"] is None
    assert record.config["runs_in"] == "llama.cpp (GGUF)"  # recorded with the run
    assert any("Q8_0" in line for line in gguf_type_lines(tiny_loaded, record))
    result = export_run(store, tiny_loaded, record, "gguf", tmp_path / "g")
    reader = gguf.GGUFReader(result["file"])
    blocks = {int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")}
    assert blocks == set(range(tiny_loaded.num_layers - 1))
    assert result["bytes"] == record.metrics["bytes_16bit"] == record.config["stages"][1]["file_bytes"]
    assert abs(result["llamacpp"]["ppl_gap"]) < 0.005, result["summary"]
    assert result["llamacpp"]["passed"] and result["llamacpp"]["floor"]["kld"] >= 0  # llama.cpp one ulp off, beside
    rtn = run(store, tiny_loaded, StackPlan(drop, QuantPlan("rtn", high_bits=8, low_bits=4, low_fraction=0.5)),
              DataSpec(seqlen=32, n_windows=2), evaluation).record
    assert "llama.cpp's types" in export_formats(rtn, tiny_loaded)["gguf"]


def test_the_llamacpp_check_passes_within_the_perplexity_promise_or_the_one_ulp_floor():
    from engine.llamacpp.agreement import check_passes

    floor = {"ppl_gap": -0.009, "kld": 0.008}  # llama.cpp moved 0.9% from itself on a one-ulp change
    assert check_passes(0.004, 0.5, None)  # within 0.5%: passes whatever the divergence
    assert check_passes(-0.012, 0.0085, floor)  # 1.2% off, but no further from llama.cpp than its own noise
    assert not check_passes(-0.012, 0.02, floor)  # more than 1.5x the floor's divergence
    assert not check_passes(-0.012, 0.0085, None)  # no floor measured: perplexity alone decides


def test_a_dry_run_line_gives_the_new_type_or_the_kept_one():
    """``llama-quantize --dry-run`` prints ``(new type)`` after an arrow for a converted tensor, and no arrow for one
    that keeps its type (Gemma-3's Q4_K_M source file under the Q4_K_M preset): both are read."""
    from engine.export.llamacpp_presets import _LINE

    converted = ("[   3/ 236] blk.0.attn_k.weight                  - [   640,    256,      1,      1], type =   q5_0, "
                 "size =     0.11 MiB ->     0.09 MiB (q4_0)")
    kept = ("[  10/ 236] blk.0.ffn_down.weight                - [  2048,    640,      1,      1], type =   q6_K, "
            "size =    1.025 MiB")
    assert [(m["name"], m["type"] or m["source"]) for m in map(_LINE.match, (converted, kept))] == [
        ("blk.0.attn_k.weight", "q4_0"), ("blk.0.ffn_down.weight", "q6_K")]


def test_the_one_ulp_copy_finds_its_tensor_from_the_header_as_the_gguf_reader_does(tmp_path):
    """The floor check's copy skips the metadata (vocabularies included) to reach one tensor, and changes nothing
    else: every tensor read back by the ``gguf`` package is as written but that one, one ulp larger."""
    import numpy as np

    from engine.llamacpp.agreement import _tensor_span, nudged_copy

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(300)])
    writer.add_array("tokenizer.ggml.scores", [float(i) for i in range(300)])
    writer.add_custom_alignment(64)
    writer.add_string("general.name", "small")
    rng = np.random.default_rng(0)
    tensors = {"token_embd.weight": rng.standard_normal((8, 16)).astype(np.float16),
               "blk.0.attn_norm.weight": rng.standard_normal(16).astype(np.float32),
               "blk.0.ffn_up.weight": rng.standard_normal((4, 16)).astype(np.float32)}
    for name, value in tensors.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        assert _tensor_span(path.read_bytes(), tensor.name)[0] == tensor.data_offset
    copy = nudged_copy(path, tmp_path / "nudged.gguf")
    after = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(copy)).tensors}
    norm = tensors["blk.0.attn_norm.weight"]
    assert np.array_equal(after["blk.0.attn_norm.weight"], np.nextafter(norm, np.float32(np.inf)))
    for name in ("token_embd.weight", "blk.0.ffn_up.weight"):
        assert np.array_equal(after[name].reshape(tensors[name].shape), tensors[name])
    with pytest.raises(ValueError, match="no float32 tensor"):
        nudged_copy(path, tmp_path / "other.gguf", tensor="token_embd.weight")  # float16: refused
    (tmp_path / "short.gguf").write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ValueError, match="truncated"):
        nudged_copy(tmp_path / "short.gguf", tmp_path / "cut.gguf", tensor="blk.0.ffn_up.weight")
    (tmp_path / "text.gguf").write_bytes(b"not a model at all, but long enough to read a header from")
    with pytest.raises(ValueError, match="not a little-endian GGUF"):
        nudged_copy(tmp_path / "text.gguf", tmp_path / "t.gguf")


@needs_llamacpp
def test_estimates_count_the_slower_evaluation_of_llamacpp_types(tiny_loaded):
    """A model in llama.cpp's types dequantizes every weight on every forward and rounds its inputs as llama.cpp
    does: its evaluation is estimated longer than dense's (measured on the model's own first layer); LayerLab's
    grids add nothing."""
    from engine.methods.quantization import Quantization
    from engine.runs.plans import QuantPlan

    rtn = QuantPlan("rtn", 32, 4, 4, 0.0, ordering="random")
    ggml_plan = QuantPlan("llama.cpp", 128, 4, 4, 0.0, ordering="random", runtime="llama.cpp")
    assert Quantization().extra_eval_seconds(tiny_loaded, rtn, 32, 2) == 0.0
    one = Quantization().extra_eval_seconds(tiny_loaded, ggml_plan, 32, 1)
    assert one > 0 and Quantization().extra_eval_seconds(tiny_loaded, ggml_plan, 32, 4) == pytest.approx(4 * one)
