"""Layer-input capture: what the decoder layers receive, reproduced by hand; the model is left as it was."""

from __future__ import annotations

import pytest
import torch

from engine.core.architectures import architecture_for, get_submodule
from engine.core.capture import capture_layer_inputs, move_to
from tests.tiny_models import TINY_FACTORIES


def _ids(n=5, seqlen=12, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_running_the_layers_by_hand_reproduces_the_model(tiny_model):
    arch = architecture_for(tiny_model.config.model_type)
    ids = _ids()
    inputs = capture_layer_inputs(tiny_model, arch, ids, batch_size=2)
    assert inputs.n_batches == 3 and [h.shape[0] for h in inputs.hidden] == [2, 2, 1]
    assert all(len(per_layer) == 3 for per_layer in inputs.layer_kwargs)
    embed = get_submodule(tiny_model, arch.embedding)
    for b, hidden in enumerate(inputs.hidden):
        batch = ids[2 * b : 2 * b + 2]
        assert torch.equal(hidden, embed(batch))  # the first layer's input is the embedding output
        for i, layer in enumerate(arch.decoder_layers(tiny_model)):
            out = layer(hidden, **inputs.kwargs_for(i, b))
            hidden = out[0] if isinstance(out, tuple) else out
        by_hand = get_submodule(tiny_model, arch.head)(get_submodule(tiny_model, arch.final_norm)(hidden))
        reference = tiny_model(input_ids=batch, use_cache=False).logits
        torch.testing.assert_close(by_hand, reference, rtol=1e-5, atol=1e-5)


def test_the_model_is_left_as_it_was_even_after_an_error():
    model = TINY_FACTORIES["llama"]()
    arch = architecture_for("llama")
    layers = arch.decoder_layers(model)
    ids = _ids(2, 8)
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    capture_layer_inputs(model, arch, ids, batch_size=1)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with pytest.raises(IndexError):
        capture_layer_inputs(model, arch, ids + 1000, batch_size=1)  # token ids beyond the vocabulary
    assert all("forward" not in layer.__dict__ for layer in layers)
    own = lambda *args, **kwargs: None  # noqa: E731 - an instance forward (e.g. an accelerate hook) is put back
    layers[1].forward = own
    capture_layer_inputs(model, arch, ids, batch_size=2)
    assert layers[1].__dict__["forward"] is own
    del layers[1].forward
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, before)


def test_signals_are_kept_where_asked_and_shared_tensors_once():
    model = TINY_FACTORIES["qwen2"]()
    arch = architecture_for("qwen2")
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[0, :3] = 0
    inputs = capture_layer_inputs(model, arch, _ids(4, 10), mask, batch_size=2, device="meta")
    assert inputs.hidden[0].device.type == "meta" and inputs.masks[0] is not None
    rotary = [inputs.layer_kwargs[i][0]["position_embeddings"][0] for i in range(3)]
    assert rotary[0].device.type == "meta" and rotary[0] is rotary[1] is rotary[2]
    assert (inputs.layer_kwargs[0][0]["position_embeddings"][0]
            is not inputs.layer_kwargs[0][1]["position_embeddings"][0])
    moved = move_to({"a": (torch.ones(2), [torch.zeros(1)]), "n": 3}, "meta")
    assert moved["a"][0].device.type == "meta" and isinstance(moved["a"][1], list) and moved["n"] == 3
