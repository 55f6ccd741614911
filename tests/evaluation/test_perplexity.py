"""Perplexity convention and its interval."""

from __future__ import annotations

import math

import pytest
import torch

import engine.evaluation.perplexity as perplexity_module
from engine.core.data import DataSpec, TokenWindows
from engine.evaluation.perplexity import bootstrap_ppl_interval, chunked_head, perplexity, window_nll_sums
from tests.tiny_families import SLICING_FAMILIES, tiny_family_model
from tests.tiny_models import TINY_FACTORIES


def _random_windows(n=6, seqlen=32, vocab=128):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (n, seqlen))
    return TokenWindows(ids, DataSpec(seqlen=seqlen, n_windows=n))


def test_matches_hf_loss_and_is_batch_invariant():
    model = TINY_FACTORIES["llama"]()
    windows = _random_windows()
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows.input_ids]
    expected = math.exp(float(torch.stack(losses).mean()))
    one = perplexity(model, windows, batch_size=1)
    four = perplexity(model, windows, batch_size=4)
    assert math.isclose(one.ppl, expected, rel_tol=1e-5)
    assert math.isclose(four.ppl, expected, rel_tol=1e-5)
    assert one.n_tokens == 6 * 31 and one.n_windows == 6 and one.seqlen == 32
    assert one.ci_low <= one.ppl <= one.ci_high


def test_progress_reports_every_batch():
    calls = []
    perplexity(TINY_FACTORIES["qwen2"](), _random_windows(n=5), batch_size=2,
               progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_bootstrap_interval_narrows_with_agreeing_windows():
    spread = bootstrap_ppl_interval(torch.tensor([10.0, 50.0, 90.0, 20.0]), 10)
    tight = bootstrap_ppl_interval(torch.tensor([40.0, 41.0, 39.0, 40.0]), 10)
    assert spread[1] - spread[0] > tight[1] - tight[0] > 0


@pytest.mark.parametrize("family", [*SLICING_FAMILIES, "gemma2"])
def test_head_in_chunks_gives_the_full_logits_nll_and_scaled_heads_keep_the_full_path(family, monkeypatch):
    """Chunked where logits are head(hidden) (the usual case), full logits where the family scales or soft-caps
    them after the head (Granite divides by ``logits_scaling``, Gemma 2 soft-caps): the same NLL either way."""
    model = tiny_family_model(family)
    windows = _random_windows(n=3, seqlen=24, vocab=model.config.vocab_size)
    parts = chunked_head(model)
    assert (parts is None) == (family in ("granite", "gemma2"))
    monkeypatch.setattr(perplexity_module, "HEAD_CHUNK", 5)  # several chunks per window, a short last one
    chunked = window_nll_sums(model, windows, batch_size=2)
    monkeypatch.setattr(perplexity_module, "chunked_head", lambda _model: None)
    full = window_nll_sums(model, windows, batch_size=2)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-6)


def test_a_decoder_that_cannot_run_alone_keeps_the_full_logits():
    class NeedsMore(torch.nn.Module):
        def forward(self, **kwargs):
            raise TypeError("this decoder needs arguments only its model passes")

    model = tiny_family_model("llama")
    model.get_decoder = NeedsMore  # an instance attribute: only this model object
    assert chunked_head(model) is None
    windows = _random_windows(n=2, seqlen=16, vocab=model.config.vocab_size)
    assert math.isfinite(perplexity(model, windows).ppl)
