"""Mixed-bit GGUF: exact where LayerLab's grid is a GGUF type, the nearest type otherwise, read back by transformers."""

from __future__ import annotations

import dataclasses

import gguf
import pytest
import torch

from engine.core.data import DataSpec, token_windows
from engine.core.models import LoadedModel
from engine.export.gguf_file import (
    choose_type,
    describe_choices,
    load_gguf,
    plan_gguf_types,
    quantized_bytes,
    size_against_run,
    write_gguf,
)
from engine.export.hf_folder import ExportError
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model
from tests.tiny_families import tiny_family_model

EXACT = QuantizerSpec(bits=4, group_size=32, zero_point="float")


@pytest.fixture
def untokenized(tiny_loaded) -> LoadedModel:
    """The tiny model without its tokenizer: a file without tokenizer metadata (49k strings) reads back
    in a second instead of ten; the built-in round trip below checks the tokenizer metadata."""
    return dataclasses.replace(tiny_loaded, tokenizer=None)


def _linear_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Linear weights as the model computes with them (a quantized variant's are dequantized)."""
    weights = {n: p for n, p in model.state_dict().items() if "proj" in n and n.endswith("weight")}
    assert weights
    return weights


def test_exact_types_reload_bit_for_bit(tiny_loaded, untokenized, tmp_path):
    quantized = quantize_model(untokenized, [4, 5, 8, 4], spec=EXACT)
    info = write_gguf(quantized, untokenized, tmp_path / "g")
    assert (info["types"]["Q4_1"], info["types"]["Q5_1"], info["types"]["Q8_0"]) == (14, 7, 7)
    assert info["exact_fraction"] == pytest.approx(21 / 28)  # 8 bits: Q8_0 is symmetric, LayerLab's grid is not
    reader = gguf.GGUFReader(info["file"])
    assert reader.get_tensor(0) is not None and "tokenizer.ggml.tokens" not in reader.fields
    assert any("no tokenizer" in note for note in info["notes"])
    layer_types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert layer_types["blk.1.ffn_down.weight"] == "Q5_1" and layer_types["blk.2.attn_q.weight"] == "Q8_0"
    reloaded = load_gguf(tmp_path / "g")
    ours, theirs = _linear_weights(quantized.model), _linear_weights(reloaded)
    for name in ours:
        if ".2." not in name:  # layer 2: re-quantized to Q8_0
            assert torch.equal(ours[name], theirs[name]), name  # q/k rows permuted and back: still exact
        else:
            assert (ours[name] - theirs[name]).abs().max() < 0.01 * ours[name].abs().max()
    windows = token_windows(DataSpec("wiki-offline", "evaluation", 32, 2), tiny_loaded.tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(windows.input_ids).logits, quantized.model(windows.input_ids).logits,
                                   rtol=0, atol=1e-2)  # F16 embedding, Q8_0 layer


def test_symmetric_grid_is_q4_0_q5_0_q8_0_bit_for_bit(untokenized, tmp_path):
    """The symmetric grid's codes are GGUF's zero-free types: every tensor exact, and smaller than Q4_1."""
    spec = QuantizerSpec(bits=4, group_size=32, zero_point="symmetric")
    quantized = quantize_model(untokenized, [3, 5, 8, 4], spec=spec)
    info = write_gguf(quantized, untokenized, tmp_path / "s")
    assert (info["types"]["Q4_0"], info["types"]["Q5_0"], info["types"]["Q8_0"]) == (14, 7, 7)
    assert info["exact_fraction"] == 1.0
    ours, theirs = _linear_weights(quantized.model), _linear_weights(load_gguf(tmp_path / "s"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_qwen2_is_written_without_the_llama_permutation(tmp_path):
    loaded = LoadedModel.from_model(tiny_family_model("qwen2"))
    quantized = quantize_model(loaded, [4, 4, 4], spec=EXACT)
    write_gguf(quantized, loaded, tmp_path / "q")
    reloaded = load_gguf(tmp_path / "q")
    ours, theirs = _linear_weights(quantized.model), _linear_weights(reloaded)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[n], theirs[n]) for n in ours)


def test_compact_types_follow_bits_and_row_length():
    spec = QuantizerSpec(bits=4, group_size=128)
    assert choose_type(2, 1536, spec, "compact").qtype == "Q2_K" and not choose_type(2, 1536, spec, "compact").exact
    narrow = choose_type(2, 576, spec, "compact")  # 576 is no multiple of 256: no k-quant fits
    assert narrow.qtype == "Q4_1" and "multiple of 256" in narrow.reason
    assert choose_type(3, 512, spec, "compact").qtype == "Q3_K" and choose_type(6, 512, spec, "compact").qtype == "Q6_K"
    assert choose_type(8, 64, spec, "compact").qtype == "Q8_0" and choose_type(4, 40, spec, "compact").qtype == "F16"
    assert choose_type(4, 512, spec, "compact").qtype == "Q4_K" and choose_type(4, 576, spec, "compact").qtype == "Q4_1"


def test_exact_types_hold_the_codes_for_any_group_that_is_a_multiple_of_32():
    integer, floating = QuantizerSpec(bits=4, group_size=128), QuantizerSpec(bits=4, group_size=64, zero_point="float")
    assert [choose_type(b, 1536, integer).qtype for b in range(2, 9)] == ["Q4_1"] * 3 + ["Q5_1", "Q8_0", "Q8_0", "Q8_0"]
    assert [choose_type(b, 1536, integer).exact for b in range(2, 9)] == [True] * 6 + [False]  # 8-bit: code-zero > int8
    # float: no Q8_0 offset
    assert [choose_type(b, 576, floating).exact for b in range(2, 9)] == [True] * 4 + [False] * 3
    assert not choose_type(4, 576, QuantizerSpec(bits=4, group_size=48)).exact  # blocks would straddle groups
    dynamic = QuantizerSpec(method="gptq", bits=4, group_size=32, act_order=True, group_params="dynamic")
    assert not choose_type(4, 64, dynamic).exact  # permuted groups are no GGUF blocks
    with pytest.raises(ExportError, match="exact' or 'compact"):
        choose_type(4, 64, integer, "small")


@pytest.mark.parametrize("zero_point, group, bits", [("integer", 64, [2, 3, 6, 7]), ("float", None, [2, 3, 5, 4])])
def test_every_exact_level_reloads_as_the_app_computed_it(untokenized, tmp_path, zero_point, group, bits):
    quantized = quantize_model(untokenized, bits, spec=QuantizerSpec(bits=4, group_size=group, zero_point=zero_point))
    info = write_gguf(quantized, untokenized, tmp_path / "g")
    assert info["exact_fraction"] == 1.0
    ours, theirs = _linear_weights(quantized.model), _linear_weights(load_gguf(tmp_path / "g"))
    for name in ours:
        if zero_point == "float" or ".3." in name:  # codes and fp16 parameters copied (Q8_0: code - zero)
            assert torch.equal(ours[name], theirs[name]), name
        else:  # integer zero point: minimum -zero*scale rounded to fp16
            torch.testing.assert_close(theirs[name], ours[name], rtol=0, atol=2e-3 * float(ours[name].abs().max()))


def test_the_dialog_lines_name_layers_types_and_reasons(tiny_loaded):
    spec = QuantizerSpec(bits=4, group_size=128)
    lines = describe_choices(plan_gguf_types(tiny_loaded, [2, 4, 4, 8], spec, "compact"))
    assert lines[0].startswith("2-bit → Q4_1: 7 tensors in 1 layer") and "multiple of 256" in lines[0]
    assert lines[1].startswith("4-bit → Q4_1: 14 tensors in 2 layers") and "Q4_K needs rows" in lines[1]
    exact = describe_choices(plan_gguf_types(tiny_loaded, [2, 4, 4, 8], spec))
    assert exact[0].startswith("2-bit → Q4_1 (exact)") and exact[-1].startswith("8-bit → Q8_0:")


def test_the_dialog_says_when_the_file_is_larger_than_the_run_shows(untokenized, tmp_path):
    """A research-grid run with 2-bit layers exports them as Q4_1: the dialog says by how much the file is larger
    than the run's size, checked against the bytes the written file's quantized tensors take."""
    spec = QuantizerSpec(bits=4, group_size=128)
    bits = [2, 2, 4, 8]
    choices = plan_gguf_types(untokenized, bits, spec)
    line = size_against_run(untokenized, bits, spec, choices)
    assert line is not None and "larger than the size this run shows" in line and "llama.cpp (GGUF)" in line
    in_file, in_run = quantized_bytes(untokenized, bits, spec, choices)
    assert in_file > 1.2 * in_run
    written = gguf.GGUFReader(write_gguf(quantize_model(untokenized, bits, spec=spec), untokenized,
                                         tmp_path / "g")["file"])
    quantized = sum(int(t.n_bytes) for t in written.tensors if "blk." in t.name and t.name.endswith(".weight")
                    and t.tensor_type != gguf.GGMLQuantizationType.F32)
    assert quantized == in_file
    exact = QuantizerSpec(bits=4, group_size=32, zero_point="float")  # Q4_1 itself: the file is the run's size
    assert size_against_run(untokenized, [4] * 4, exact, plan_gguf_types(untokenized, [4] * 4, exact)) is None


def test_families_without_a_gguf_mapping_are_refused(tmp_path):
    loaded = LoadedModel.from_model(tiny_family_model("phi3"))
    quantized = quantize_model(loaded, [4, 4, 4], spec=EXACT)
    with pytest.raises(ExportError, match="Export a Hugging Face folder instead"):
        write_gguf(quantized, loaded, tmp_path / "p")
    assert not (tmp_path / "p").exists()


@pytest.mark.slow
def test_builtin_mixed_bit_gguf_round_trip(builtin, tmp_path):
    """The built-in model at 4/3 bits (g128, integer zero): exact types within 2% read back by transformers'
    GGUF loader with the built-in tokenizer in the file; compact types chosen and smaller (their cost is
    measured by bench/export.py: each reload reads the 49k-token tokenizer twice, ~20 s)."""
    from engine.export.verify import round_trip

    bits = [3 if i % 2 else 4 for i in range(builtin.num_layers)]
    quantized = quantize_model(builtin, bits, spec=QuantizerSpec(bits=4, group_size=128))
    windows = token_windows(DataSpec("wiki-offline", "evaluation", 128, 4), builtin.tokenizer)
    exact = write_gguf(quantized, builtin, tmp_path / "exact")
    assert exact["exact_fraction"] == 1.0 and set(exact["types"]) == {"Q4_1", "F16", "F32"}
    check = round_trip(quantized.model, load_gguf(tmp_path / "exact"), windows, 0.02)
    assert check.passed, check.summary()
    compact = write_gguf(quantized, builtin, tmp_path / "compact", mode="compact")
    assert compact["types"]["Q3_K"] == 15 and compact["bytes"] < exact["bytes"]  # down_proj rows (1536) of 3-bit layers
    reader = gguf.GGUFReader(exact["file"])
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert len(tokens.data) == len(builtin.tokenizer) and reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert {t.tensor_type.name for t in gguf.GGUFReader(compact["file"]).tensors} >= {"Q3_K", "Q4_K"}
