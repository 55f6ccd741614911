"""The built-in model quantized in llama.cpp's types: the exported GGUF runs in llama.cpp as it ran in the app."""

from __future__ import annotations

import pytest

from engine.core.data import DataSpec, token_windows
from engine.export.gguf_llamacpp import write_llamacpp_gguf
from engine.llamacpp.runtime import status
from engine.quant.allocation import allocate_average, layer_order
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not status().available, reason=f"llama.cpp: {status().reason}")]


def test_mixed_allocation_runs_in_llamacpp_as_in_the_app(builtin, tmp_path):
    """Perplexity within 0.5% of llama.cpp's on the same file; the per-token KL divergence between the two no
    larger than llama.cpp's from itself when one norm vector of the file moves by one ulp (activation rounding
    makes any last-bit difference count: :func:`engine.llamacpp.agreement.one_ulp_floor`)."""
    from engine.llamacpp.agreement import agreement, one_ulp_floor

    order = layer_order(builtin.num_layers, "importance", list(range(builtin.num_layers)))
    allocation = allocate_average(order, [6, 3], 4.5)
    spec = QuantizerSpec(method="llama.cpp", bits=6)
    quantized = quantize_model(builtin, allocation, spec=spec, use_cache=False)
    info = write_llamacpp_gguf(quantized, builtin, tmp_path / "g")
    assert {"Q8_0", "Q4_0", "Q6_K", "Q3_K"} <= set(info["types"])  # fallbacks (576-wide rows) and k-quants (down)
    windows = token_windows(DataSpec(seqlen=256, n_windows=4), builtin.tokenizer)
    result = agreement(quantized.model, info["file"], windows)
    assert abs(result.ppl_gap) < 0.005, result.describe()  # the target: within 0.5%
    assert result.same_top > 0.9
    floor = one_ulp_floor(info["file"], windows, tmp_path)
    assert 0.001 < floor.mean and result.kld_mean < 1.5 * floor.mean, (result.describe(), floor)


def test_a_llamacpp_preset_read_off_its_dry_run_is_the_file_llama_quantize_writes(builtin, tmp_path):
    """Q4_K_M as a LayerLab allocation (types from ``llama-quantize --dry-run``): the same type for every tensor
    and the same file size as llama-quantize's own Q4_K_M of the same F32 file."""
    import subprocess

    import gguf

    from engine.export.gguf_llamacpp import gguf_file_bytes, layout, write_float_gguf
    from engine.export.llamacpp_presets import preset_bits
    from engine.llamacpp.runtime import tool

    bits = preset_bits(builtin, "Q4_K_M")
    assert bits[0] == {"q": 4, "k": 4, "v": 8, "o": 4, "gate": 4, "up": 4, "down": 6}  # v: Q6_K -> Q8_0 at 576
    assert bits[3] == 4  # a layer llama.cpp does not bump: one level
    spec = QuantizerSpec(method="llama.cpp", bits=8)
    f32 = write_float_gguf(builtin, tmp_path / "f32")
    theirs = tmp_path / "q4km.gguf"
    subprocess.run([str(tool("llama-quantize")), str(f32), str(theirs), "Q4_K_M"], check=True, capture_output=True)
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
    entries, _ = layout(builtin, spec, tuple(bits))
    ours = {e.name: e.qtype for e in entries}
    assert {n: t for n, t in written.items() if n in ours} == ours
    assert abs(gguf_file_bytes(builtin, spec, tuple(bits)) / theirs.stat().st_size - 1) < 1e-3
