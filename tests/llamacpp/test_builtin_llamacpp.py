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
    from engine.llamacpp.agreement import agreement

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
