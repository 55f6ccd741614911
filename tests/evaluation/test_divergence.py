"""KL divergence to dense from the bounded top-k + tail-sample reference, against the full KL."""

from __future__ import annotations

import pytest
import torch

from engine.core.data import DataSpec, token_windows
from engine.evaluation.divergence import DenseReference, DivergenceMeter, cached_reference
from engine.evaluation.perplexity import perplexity


def _full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    logp, logq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _reference(logits: torch.Tensor) -> DenseReference:
    reference = DenseReference.empty(logits.shape[0])
    for start in range(0, logits.shape[0], 256):
        reference.observe(torch.arange(start, min(start + 256, logits.shape[0])), logits[start:start + 256])
    return reference


def _meter(reference: DenseReference, logits: torch.Tensor):
    meter = DivergenceMeter(reference)
    meter.observe(torch.arange(logits.shape[0]), logits)
    return meter.result()


def test_equal_models_have_zero_divergence_and_the_same_top_token():
    dense = torch.randn(512, 3000, generator=torch.Generator().manual_seed(0)) * 4
    found = _meter(_reference(dense), dense)
    assert found.mean == pytest.approx(0.0, abs=1e-6) and found.same_top == 1.0


@pytest.mark.parametrize("noise", [0.3, 1.0, 3.0])
def test_mean_median_and_p99_track_the_full_kl(noise):
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(2048, 5000, generator=generator) * 4
    compressed = dense + noise * torch.randn(2048, 5000, generator=generator)
    full = _full_kl(dense, compressed)
    found = _meter(_reference(dense), compressed)
    assert found.mean == pytest.approx(float(full.mean()), rel=0.01)
    assert found.median == pytest.approx(float(full.median()), rel=0.03)
    assert found.p99 == pytest.approx(float(torch.quantile(full, 0.99)), rel=0.03)
    same = (dense.argmax(-1) == compressed.argmax(-1)).double().mean()
    assert found.same_top == pytest.approx(float(same))


def test_runs_store_kld_to_dense_and_dense_records_the_reference_once(tiny_loaded):
    from engine.runs.plans import DropPlan, EvalPlan
    from engine.runs.runner import run_dropping
    from engine.runs.store import ResultsStore

    evaluation = EvalPlan(DataSpec(split="evaluation", seqlen=32, n_windows=2))
    windows = token_windows(evaluation.data, tiny_loaded.tokenizer)
    assert cached_reference(tiny_loaded.fingerprint, windows) is None
    store = ResultsStore()
    outcome = run_dropping(store, tiny_loaded, DropPlan(block="layer", count=1, by="custom", custom=(1,)),
                           DataSpec(split="calibration", seqlen=32, n_windows=2), evaluation)
    assert cached_reference(tiny_loaded.fingerprint, windows) is not None  # recorded with dense's perplexity
    metrics = outcome.metrics
    assert metrics["kld_mean"] > 0 and 0 <= metrics["same_top"] <= 1
    assert metrics["kld_median"] <= metrics["kld_p99"]
    dense = next(r for r in store.runs() if r.method == "dense")
    assert "kld_mean" not in dense.metrics


@pytest.mark.slow
def test_builtin_model_kld_matches_the_full_computation(builtin):
    from engine.llamacpp.agreement import compare_sides
    from engine.quant.grid import QuantizerSpec
    from engine.quant.quantize_model import quantize_model

    windows = token_windows(DataSpec(seqlen=128, n_windows=4), builtin.tokenizer)
    quantized = quantize_model(builtin, [4] * builtin.num_layers, spec=QuantizerSpec(bits=4), use_cache=False)
    reference = DenseReference.empty(windows.n_windows * (windows.seqlen - 1))
    perplexity(builtin.model, windows, observer=reference.observe)
    meter = DivergenceMeter(reference)
    perplexity(quantized.model, windows, observer=meter.observe)
    found = meter.result()
    full = compare_sides({"dense": builtin.model, "q": quantized.model}, windows).divergence[("dense", "q")]
    assert found.mean == pytest.approx(full.mean, rel=0.01)
    assert found.p99 == pytest.approx(full.p99, rel=0.03) and found.same_top == pytest.approx(full.same_top)
