"""AppTest of the memory plan under the run buttons: shown before a run, and a run that would not fit is refused."""

from __future__ import annotations

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, use_small_data


def _memory_captions(at) -> list[str]:
    return [c.value for c in at.caption if c.value.startswith("Memory: ≈ +")]


def test_quantization_page_shows_the_plan_and_refuses_a_run_that_does_not_fit(tiny_app, monkeypatch):
    at = use_small_data(open_app("quantization"), windows=2, seqlen=40)
    at.selectbox(key="keep.quant_order").set_value("random").run()
    (caption,) = _memory_captions(at)
    assert "codes" in caption and "free on cpu" in caption and "beyond the loaded model" in caption
    before = [r.id for r in ResultsStore().runs()]
    monkeypatch.setattr("engine.core.memory.free_bytes", lambda device: 2**20)  # 1 MiB free
    at.run()
    assert not _memory_captions(at)
    assert any("only 1.0 MiB are free" in w.value for w in at.warning)
    click(at, "Preview")
    assert not at.exception
    assert "only 1.0 MiB are free" in at.error[0].value and "largest part" in at.error[0].value
    assert [r.id for r in ResultsStore().runs()] == before


def test_slicing_and_dropping_pages_show_the_plan(tiny_app):
    at = use_small_data(open_app("slicing"), windows=2, seqlen=40)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    assert any("sliced model" in c for c in _memory_captions(at))
    at = use_small_data(open_app("dropping"), windows=2, seqlen=40)
    if any(b.label.startswith("Compute LR scores") for b in at.button):
        click(at, "Compute LR scores")
    assert any("evaluation activations" in c for c in _memory_captions(at))


def test_a_model_too_large_for_free_memory_is_refused_and_the_current_one_stays(tiny_app, tmp_path, monkeypatch):
    import shutil

    at = open_app("model")
    other = shutil.copytree(tiny_app, tmp_path / "other-model")
    monkeypatch.setattr("engine.core.memory.free_bytes", lambda device: 2**10)  # 1 KiB free
    at.sidebar.text_input[0].set_value(str(other))
    # the message names the device and the 32-bit dtype
    next(s for s in at.sidebar.selectbox if s.label == "Device").set_value("cpu")
    next(s for s in at.sidebar.selectbox if s.label == "Dtype").set_value("float32")
    at.sidebar.button[0].click().run()
    assert not at.exception
    error = next(e.value for e in at.error if e.value.startswith("Model not loaded"))
    assert "for its weights in float32 but only 0.0 MiB is free on cpu" in error and "bfloat16" in error
    assert any(c.value == f"Still using {tiny_app}." for c in at.caption)
