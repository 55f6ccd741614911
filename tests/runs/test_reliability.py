"""Bad input through the UI leaves the store and the shared base model untouched."""

from __future__ import annotations

import hashlib

import pytest
import torch
from streamlit.testing.v1 import AppTest

from engine.runs.store import ResultsStore
from tests.apptest import click, open_app, use_small_data
from tests.tiny_models import TINY_FACTORIES

pytestmark = pytest.mark.slow


def _full_hash(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shared_model():
    from ui.session import _cached_model

    return _cached_model("smollm2-135m", "auto", "auto", False).model


def _sidebar_with(source: str) -> AppTest:
    def script():
        import streamlit as st

        from ui.session import require_model
        from ui.sidebar import model_sidebar

        model_sidebar()
        st.title(f"Page for {require_model().source}")

    at = AppTest.from_function(script, default_timeout=120).run()
    at.sidebar.text_input[0].set_value(source)
    return at.sidebar.button[0].click().run()


def test_bad_inputs_then_real_runs_keep_store_and_base_model_intact(tmp_path, builtin):
    open_app()  # loads the shared model into the process-wide cache
    base = _shared_model()
    before_hash, before_rows = _full_hash(base), [r.id for r in ResultsStore().runs()]
    t5 = tmp_path / "t5"  # an encoder-decoder checkpoint: not a causal LM
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                        vocab_size=64)).save_pretrained(t5)
    bin_only = tmp_path / "bin-only"  # weights only as a pickle: LayerLab must refuse to unpickle
    tiny = TINY_FACTORIES["llama"]()
    tiny.save_pretrained(bin_only)
    (bin_only / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), bin_only / "pytorch_model.bin")
    builtin.tokenizer.save_pretrained(bin_only)

    messages = {}
    for name, source in (("missing id", "nobody/no-such-model"), ("unsupported", str(t5)),
                         ("pickle only", str(bin_only))):
        at = _sidebar_with(source)
        assert not at.exception
        messages[name] = at.error[0].value
        assert at.title[0].value == "Page for smollm2-135m"
    assert "cannot be reached" in messages["missing id"]
    assert "encoder-decoder" in messages["unsupported"]
    assert "safetensors" in messages["pickle only"]

    at = open_app()
    at.number_input(key="keep.eval_seqlen").set_value(9000).run()
    assert "longer than this model allows" in at.error[0].value

    at = use_small_data(open_app("slicing"))
    at.radio(key="keep.slicing_schedule").set_value("custom").run()
    at.session_state["slicing_custom"] = {"edited_rows": {0: {"fraction": -0.5}}, "added_rows": [],
                                          "deleted_rows": []}
    at.run()
    assert at.error and not at.exception

    at = use_small_data(open_app("quantization"))
    if any(b.label.startswith("Compute") for b in at.button):
        click(at, "Compute")
    at.select_slider(key="keep.quant_low").set_value(8).run()
    assert "must not exceed the high level" in at.error[0].value
    assert [r.id for r in ResultsStore().runs()] == before_rows

    at = use_small_data(open_app("slicing"))
    at.radio(key="keep.slicing_schedule").set_value("constant").run()
    at.slider(key="keep.slicing_target").set_value(10).run()
    click(at, "Run slicing")
    at = use_small_data(open_app("quantization"))
    click(at, "Preview")
    assert not at.exception and not at.error
    new = [r for r in ResultsStore().runs() if r.id not in before_rows]
    methods = sorted(r.method for r in new)
    assert {"quantization", "slicing"} <= set(methods) and methods.count("dense") <= 1  # dense once per windows
    assert _shared_model() is base and _full_hash(base) == before_hash
