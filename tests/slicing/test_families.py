"""SliceGPT on every family it supports (exact at 0%, finite at 25%) and clear refusals for the others."""

from __future__ import annotations

import pytest
import torch

from engine.core.models import LoadedModel
from engine.slicing.schedules import schedule_constant
from engine.slicing.slice_model import SlicingUnsupportedError, load_sliced, save_sliced, slice_model
from tests.slicing.test_slicing import logits, max_rel_err, windows
from tests.tiny_families import CONFIGS, SLICING_FAMILIES, tiny_family_model

REFUSED = {  # family -> words the reason must contain
    "gemma2": "computational invariance",
    "mixtral": "mixture-of-experts",
    "qwen2_moe": "mixture-of-experts",
    "olmo": "verified exact only for",
    "starcoder2": "verified exact only for",
}


def test_every_family_is_either_sliced_or_refused():
    assert set(SLICING_FAMILIES) | set(REFUSED) == set(CONFIGS)


@pytest.mark.parametrize("name", SLICING_FAMILIES)
def test_unsliced_rotation_is_exact_and_25_percent_runs(name):
    model = tiny_family_model(name)
    loaded = LoadedModel.from_model(model)
    assert loaded.architecture.reason("slicing") is None
    probe = windows(n=2, seed=7).input_ids
    exact = slice_model(loaded, schedule_constant(0.0, 3), windows(), batch_size=4)
    assert max_rel_err(logits(model, probe), logits(exact.model, probe)) <= 1e-4
    sliced = slice_model(loaded, schedule_constant(0.25, 3), windows(), batch_size=4)
    assert sliced.dims == [48, 48, 48]
    assert torch.isfinite(logits(sliced.model, probe)).all()


@pytest.mark.parametrize("name", SLICING_FAMILIES)
def test_slicing_shares_the_base_and_never_writes_it(name):
    """The sliced model is built over the base's tensors (no second full copy): every tensor it changes is
    new, the rest (biases it keeps, rotary tables) are the base's own, and the base reads as before."""
    model = tiny_family_model(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliced = slice_model(LoadedModel.from_model(model), schedule_constant(0.25, 3), windows(), batch_size=4).model
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # LayerNorm centring included
    base = {t.data_ptr() for t in model.parameters()}
    changed = [n for n, p in sliced.named_parameters() if n.endswith("weight") and "norm" not in n]
    assert changed and all(p.data_ptr() not in base for n, p in sliced.named_parameters() if n in changed)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    own = sum(p.numel() * p.element_size() for p in sliced.parameters() if p.data_ptr() not in base)
    assert own < base_bytes


@pytest.mark.parametrize("name", ["opt", "phi", "gemma", "granite"])
def test_sliced_model_saves_and_loads(name, tmp_path):
    sliced = slice_model(LoadedModel.from_model(tiny_family_model(name)), schedule_constant(0.25, 3), windows())
    save_sliced(sliced, tmp_path / "s")
    again = load_sliced(tmp_path / "s")
    probe = windows(n=1, seed=5).input_ids
    torch.testing.assert_close(logits(again.model, probe), logits(sliced.model, probe))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_slicing_is_refused_with_the_reason(name):
    loaded = LoadedModel.from_model(tiny_family_model(name))
    assert REFUSED[name] in loaded.architecture.reason("slicing")
    with pytest.raises(SlicingUnsupportedError, match=REFUSED[name]):
        slice_model(loaded, schedule_constant(0.25, 3), windows())
