"""The scan: exact zeros where nothing changes, the cached-input shortcut equals a naive re-run, real slicing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from engine.core.architectures import architecture_for
from engine.core.data import DataSpec, TokenWindows
from engine.core.models import LoadedModel, weights_fingerprint
from engine.sensitivity.actions import parse_action
from engine.sensitivity.dense import dense_reference
from engine.sensitivity.errors import ScanCancelled
from engine.sensitivity.layer_actions import layer_for_action
from engine.sensitivity.scan import scan_action
from engine.slicing.slice_model import slice_model


class _Identity(torch.nn.Module):
    def forward(self, hidden_states, **_kwargs):
        return hidden_states


@torch.no_grad()
def naive_kl(model, arch, ids, action, dense) -> list[float]:
    """KL per layer from full forwards of a copy of the model with layer i replaced (log-softmax over V)."""
    reference = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    result = []
    for i in range(len(arch.decoder_layers(model))):
        changed = copy.deepcopy(model)
        layers = arch.decoder_layers(changed)
        modified, _ = layer_for_action(layers[i], arch, action, lambda i=i: dense.layer_batches(i, "cpu"))
        layers[i] = modified if modified is not None else _Identity()
        log_q = F.log_softmax(changed(input_ids=ids).logits[:, :-1].float(), dim=-1)
        result.append(float((reference.exp() * (reference - log_q)).sum(-1).mean()))
    return result


@pytest.mark.parametrize("text", ["quant:3", "drop", "drop-attn", "drop-mlp"])
def test_cached_input_scan_equals_a_naive_full_rerun(tiny_model, ids, text):
    arch = architecture_for(tiny_model.config.model_type)
    dense = dense_reference(tiny_model, arch, ids, batch_size=4)
    action = parse_action(text)
    measured = scan_action(tiny_model, arch, dense, action)
    expected = naive_kl(tiny_model, arch, ids, action, dense)
    assert measured.kl == pytest.approx(expected, rel=1e-4, abs=1e-7)
    assert all(v > 0 for v in measured.kl)
    assert len(measured.window_kl) == 3 and len(measured.window_kl[0]) == 6
    assert sum(measured.window_kl[0]) / 6 == pytest.approx(measured.kl[0])


def test_dropping_a_constructed_identity_layer_costs_exactly_nothing(llama, ids):
    model, arch = llama
    layer = arch.decoder_layers(model)[1]
    with torch.no_grad():  # both blocks write zeros: layer 1 returns its input exactly
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    dense = dense_reference(model, arch, ids, batch_size=4)
    for text in ("drop", "drop-attn", "drop-mlp"):
        damage = scan_action(model, arch, dense, parse_action(text))
        assert damage.kl[1] == 0.0 and damage.delta_nll[1] == 0.0
        assert damage.kl[0] > 0 and damage.kl[2] > 0


def test_eight_bits_cost_a_tiny_kl_and_far_less_than_three(llama, ids):
    model, arch = llama
    dense = dense_reference(model, arch, ids, batch_size=4)
    eight = scan_action(model, arch, dense, parse_action("quant:8"))
    three = scan_action(model, arch, dense, parse_action("quant:3"))
    assert all(0 <= v < 1e-5 for v in eight.kl)
    assert all(e * 50 < t for e, t in zip(eight.kl, three.kl))
    assert all(abs(d) < 1e-3 for d in eight.delta_nll)
    assert 8 < eight.details[0]["bits_per_weight"] <= 8.5  # + fp16 scale and zero per group of ≤ 128 inputs


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_slicing_one_layer_matches_real_slicegpt(name, ids):
    from tests.tiny_models import TINY_FACTORIES

    model = TINY_FACTORIES[name]()
    arch = architecture_for(model.config.model_type)
    dense = dense_reference(model, arch, ids, batch_size=4)
    action = parse_action("slice:0.25")
    measured = scan_action(model, arch, dense, action)
    hidden = model.config.hidden_size
    with torch.no_grad():
        reference = F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)
    calibration = TokenWindows(ids, DataSpec(split="calibration", seqlen=32, n_windows=6))
    for i in range(len(arch.decoder_layers(model))):
        dims = [hidden] * len(arch.decoder_layers(model))
        dims[i] = action.kept_dims(hidden)
        sliced = slice_model(LoadedModel.from_model(model), dims, calibration, batch_size=4).model
        with torch.no_grad():
            log_q = F.log_softmax(sliced(input_ids=ids).logits[:, :-1].float(), dim=-1)
        real = float((reference.exp() * (reference - log_q)).sum(-1).mean())
        assert measured.kl[i] == pytest.approx(real, rel=2e-4), i
        assert measured.details[i]["kept_dims"] == 48


def test_gptq_action_runs_on_the_dense_layer_inputs(llama, ids):
    model, arch = llama
    dense = dense_reference(model, arch, ids, batch_size=4)
    damage = scan_action(model, arch, dense, parse_action("gptq:3"))
    assert all(0 < v < 1 for v in damage.kl)
    assert "GPTQ 3-bit" in damage.details[0]["quantizer"]


def test_the_shared_model_is_never_touched(llama, ids):
    model, arch = llama
    before = weights_fingerprint(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    shared = arch.decoder_layers(model)
    calls = []  # every call of a shared layer: (stubbed forward?, hooks other than this one)
    handles = [layer.register_forward_pre_hook(lambda module, _args: calls.append(
        ("forward" in module.__dict__, len(module._forward_pre_hooks) - 1, len(module._forward_hooks))))
        for layer in shared]
    dense = dense_reference(model, arch, ids, batch_size=4)
    for text in ("quant:3", "gptq:3", "slice:0.25", "drop", "drop-attn", "drop-mlp"):
        scan_action(model, arch, dense, parse_action(text))
    for handle in handles:
        handle.remove()
    assert len(calls) > 3 * 6 and set(calls) == {(False, 0, 0)}
    assert weights_fingerprint(model) == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in shared)


def test_a_stop_request_cancels_with_a_clear_message(llama, ids):
    model, arch = llama
    dense = dense_reference(model, arch, ids, batch_size=4)
    calls = iter(range(100))
    with pytest.raises(ScanCancelled, match="stopped at layer 1 of 3; nothing of it was stored"):
        scan_action(model, arch, dense, parse_action("drop"), should_stop=lambda: next(calls) >= 2)


def test_batch_size_does_not_change_the_numbers(llama, ids):
    model, arch = llama
    one = scan_action(model, arch, dense_reference(model, arch, ids, batch_size=1), parse_action("drop"))
    four = scan_action(model, arch, dense_reference(model, arch, ids, batch_size=4), parse_action("drop"))
    assert one.kl == pytest.approx(four.kl, rel=1e-4)


def test_one_linear_alone_is_measured_like_a_naive_rerun_and_costs_less_than_its_layer(llama, ids):
    """Quantizing only ``down`` (2 bits): the cached-input scan equals the naive full re-run, and every layer's
    damage is below quantizing all its linears; the facts name the module's own bits per weight."""
    model, arch = llama
    dense = dense_reference(model, arch, ids, batch_size=4)
    down = parse_action("quant:2@down")
    measured = scan_action(model, arch, dense, down)
    assert measured.kl == pytest.approx(naive_kl(model, arch, ids, down, dense), rel=1e-4, abs=1e-7)
    whole = scan_action(model, arch, dense, parse_action("quant:2"))
    assert all(0 < part < full for part, full in zip(measured.kl, whole.kl))
    assert measured.spec == down and measured.details[0]["bits_per_weight"] > 2
