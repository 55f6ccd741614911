"""CUDA paths (issue #18); skipped without a CUDA GPU.

No GPU was lent to the session that wrote these tests: they have not run yet.
On a CUDA machine, `.venv/bin/python -m pytest tests/gpu` runs them (the CUDA build of torch is
installed as the README's GPU section says; nothing here needs the network).
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.core.data import DataSpec, TokenWindows
from engine.core.memory import ModelShape, plan_memory
from engine.core.models import LoadedModel
from engine.evaluation.perplexity import perplexity
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import apply_weights, quantize_model
from engine.scores.redundancy import layer_redundancy
from engine.slicing.schedules import schedule_constant
from engine.slicing.slice_model import slice_model
from tests.tiny_families import tiny_family_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def _windows(n: int = 4, seqlen: int = 32, vocab: int = 128, seed: int = 0) -> TokenWindows:
    ids = torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))
    return TokenWindows(ids, DataSpec(split="calibration", seqlen=seqlen, n_windows=n))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_unsliced_rotation_is_exact_in_fp32_and_bounded_in_bf16():
    probe = _windows(2, seed=7).input_ids
    for dtype, bound in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = tiny_family_model("llama").to(CUDA, dtype)
        sliced = slice_model(LoadedModel.from_model(model), schedule_constant(0.0, 3), _windows(), batch_size=4)
        assert _rel(_logits(sliced.model, probe), _logits(model, probe)) <= bound, dtype


def test_scores_on_cuda_equal_the_cpu_scores():
    model = tiny_family_model("llama")
    windows = _windows()
    on_cpu = layer_redundancy(model, LoadedModel.from_model(model).architecture, windows)
    gpu_model = copy.deepcopy(model).to(CUDA)
    on_gpu = layer_redundancy(gpu_model, LoadedModel.from_model(gpu_model).architecture, windows)
    torch.testing.assert_close(torch.tensor(on_gpu.lr), torch.tensor(on_cpu.lr), rtol=0, atol=1e-4)


def test_quantized_variant_logits_equal_a_materialised_copy_on_cuda():
    model = tiny_family_model("llama").to(CUDA)
    loaded = LoadedModel.from_model(model)
    variant = quantize_model(loaded, [4, 3, 4], spec=QuantizerSpec(method="rtn", group_size=32), use_cache=False)
    materialised = copy.deepcopy(model)
    apply_weights(materialised, loaded.architecture, variant.weights)
    probe = _windows(2, seed=3).input_ids
    assert torch.equal(_logits(variant.model, probe), _logits(materialised, probe))


def test_memory_plan_is_within_15_percent_of_the_measured_peak():
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(CUDA).eval()
    loaded = LoadedModel.from_model(model)
    windows = _windows(8, 512, vocab=32000)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    variant = quantize_model(loaded, [4] * 8, spec=QuantizerSpec(method="rtn", group_size=128), use_cache=False)
    perplexity(variant.model, windows)
    measured = torch.cuda.max_memory_allocated() - base
    plan = plan_memory(ModelShape.of(model, loaded.architecture), "quantization-rtn", CUDA, eval_seqlen=512)
    assert abs(measured - plan.extra_bytes) <= 0.15 * plan.extra_bytes, (measured, plan.parts)
