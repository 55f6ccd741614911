"""The built-in model end to end: GGUF conversion cache, perplexity, store."""

from __future__ import annotations

import pytest

from engine.core import builtins, models
from engine.core.data import DataSpec, token_windows
from engine.evaluation.perplexity import perplexity

pytestmark = pytest.mark.slow


def test_conversion_is_cached_and_reused(builtin, monkeypatch):
    folder = builtins.builtin_model_dir()
    assert (folder / "model.safetensors").exists()
    monkeypatch.setattr(builtins, "GgufConfig", None)  # a second conversion would now crash
    again = models.load_model("smollm2-135m")
    assert again.fingerprint == builtin.fingerprint
    assert builtin.card["layers"] == 30 and builtin.card["hidden size"] == 576
    assert "4-bit" in builtin.note and "Q4_1" in builtin.note


def test_baseline_perplexity_is_sane_and_stored(builtin, store):
    windows = token_windows(DataSpec(split="evaluation", seqlen=128, n_windows=4), builtin.tokenizer)
    result = perplexity(builtin.model, windows)
    assert 5 < result.ppl < 80, result
    run_id = store.add_run(model=builtin.source, model_fingerprint=builtin.fingerprint, method="dense",
                           config={}, data=windows.spec.to_dict(), metrics=result.to_metrics(),
                           duration_s=1.0)
    (run,) = store.runs(model="smollm2-135m")
    assert run.id == run_id and run.metrics["ppl"] == pytest.approx(result.ppl)
