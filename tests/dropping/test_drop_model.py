"""Dropping layers and blocks: exact when nothing goes, identity layers leave logits unchanged, honest counts."""

from __future__ import annotations

import pytest
import torch

from engine.core.architectures import get_submodule
from engine.core.models import LoadedModel
from engine.dropping.choose import (
    DropError,
    check_drop,
    choose_iteratively,
    choose_layers,
    sensitivity_ranking,
    top_ranked,
)
from engine.dropping.drop_model import drop_model, load_dropped, save_dropped
from engine.scores.redundancy import LayerRedundancy
from tests.tiny_models import COMMON, TINY_FACTORIES

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _make_identity(model, arch, index: int) -> None:
    """Layer ``index`` adds nothing to the residual stream: its two output projections are zero."""
    layer = arch.decoder_layers(model)[index]
    with torch.no_grad():
        get_submodule(layer, arch.attn_output).weight.zero_()
        get_submodule(layer, arch.mlp_output).weight.zero_()


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_dropping_nothing_is_exact_and_the_base_is_untouched(name):
    base = LoadedModel.from_model(TINY_FACTORIES[name]())
    before = {k: v.clone() for k, v in base.model.state_dict().items()}
    dropped = drop_model(base, "layer", [])
    assert torch.equal(_logits(dropped.model), _logits(base.model))
    assert all(torch.equal(before[k], v) for k, v in base.model.state_dict().items())


@pytest.mark.parametrize("block", ["layer", "attention"])
def test_a_dropped_model_shares_the_kept_weights_and_never_changes_the_base(block):
    base = LoadedModel.from_model(TINY_FACTORIES["llama"]())
    layer_idx = [get_submodule(layer, "self_attn").layer_idx for layer in base.architecture.decoder_layers(base.model)]
    dropped = drop_model(base, block, [1])
    base_tensors = {t.data_ptr() for t in base.model.parameters()}
    assert all(p.data_ptr() in base_tensors for p in dropped.model.parameters())  # no new weight memory
    assert base.model.config.num_hidden_layers == 3 and len(base.architecture.decoder_layers(base.model)) == 3
    assert [get_submodule(layer, "self_attn").layer_idx
            for layer in base.architecture.decoder_layers(base.model)] == layer_idx  # renumbering hit the copy only
    assert all(not type(m).__name__ == "SkippedBlock" for m in base.model.modules())
    assert base.fingerprint == LoadedModel.from_model(base.model).fingerprint


@pytest.mark.parametrize("name", sorted(TINY_FACTORIES))
def test_dropping_an_identity_layer_leaves_logits_unchanged(name):
    model = TINY_FACTORIES[name]()
    base = LoadedModel.from_model(model)
    _make_identity(model, base.architecture, 1)
    reference = _logits(model)
    dropped = drop_model(base, "layer", [1])
    assert len(base.architecture.decoder_layers(dropped.model)) == 2
    assert dropped.model.config.num_hidden_layers == 2
    torch.testing.assert_close(_logits(dropped.model), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block, output", [("attention", "attn_output"), ("mlp", "mlp_output")])
def test_dropping_a_block_equals_zeroing_its_output(block, output):
    model = TINY_FACTORIES["llama"]()
    base = LoadedModel.from_model(model)
    dropped = drop_model(base, block, [0, 2])
    zeroed = TINY_FACTORIES["llama"]()
    with torch.no_grad():
        for i in (0, 2):
            get_submodule(base.architecture.decoder_layers(zeroed)[i],
                          getattr(base.architecture, output)).weight.zero_()
    torch.testing.assert_close(_logits(dropped.model), _logits(zeroed), rtol=1e-5, atol=1e-5)


def test_parameter_counts_by_hand():
    base = LoadedModel.from_model(TINY_FACTORIES["llama"]())  # hidden 64, inter 96, 4 heads, 2 kv heads
    d, inter, kv = COMMON["hidden_size"], COMMON["intermediate_size"], 2 * COMMON["hidden_size"] // 4
    attention = d * d + 2 * d * kv + d * d  # q, k, v, o
    mlp = 3 * d * inter
    layer = attention + mlp + 2 * d  # two norms
    dense = base.model.num_parameters()
    assert drop_model(base, "layer", [1]).report.params_dropped == dense - layer
    assert drop_model(base, "attention", [1, 2]).report.params_dropped == dense - 2 * (attention + d)
    assert drop_model(base, "mlp", [0]).report.params_dropped == dense - (mlp + d)


def test_save_and_reload(tmp_path):
    base = LoadedModel.from_model(TINY_FACTORIES["qwen2"]())
    for block in ("layer", "attention"):
        dropped = drop_model(base, block, [1])
        folder = save_dropped(dropped, tmp_path / block)
        back = load_dropped(folder)
        assert back.report.layers == [1] and back.report.block == block
        torch.testing.assert_close(_logits(back.model), _logits(dropped.model))


def test_choices_and_refusals():
    lr = [0.1, 0.9, 0.95, 0.5, 0.99]
    scores = LayerRedundancy(lr=lr, attn_cos=[0.99, 0.2, 0.3, 0.98, 0.1], mlp_cos=lr, position_cos=[], window_cos=[],
                             histogram=[], n_tokens=1, n_windows=1, seqlen=1, data_label="t")
    assert choose_layers(scores, 5, 2, "lr") == [1, 2]  # layer 4 (0.99) is the protected last layer
    assert choose_layers(scores, 5, 2, "lr", protect_ends=False) == [2, 4]
    assert choose_layers(scores, 5, 1, "attention") == [3]
    with pytest.raises(DropError, match="Only 3 layers can be dropped"):
        choose_layers(scores, 5, 4, "lr")
    with pytest.raises(DropError, match="leaves no model"):
        check_drop(3, "layer", [0, 1, 2], protect_ends=False)
    with pytest.raises(DropError, match="protected"):
        check_drop(5, "layer", [0], protect_ends=True)
    with pytest.raises(DropError, match="do not exist"):
        check_drop(5, "mlp", [7], protect_ends=False)


def test_iterative_choice_re_ranks_after_each_drop():
    """Layers 1 and 2 are twins: each looks redundant only while the other is there."""
    calls = []

    def rank(dropped):
        calls.append(dropped)
        values = [0.0, 0.9, 0.8, 0.5, 0.0]
        if 1 in dropped:
            values[2] = 0.1  # without its twin, layer 2 carries the computation
        return values

    assert choose_layers(LayerRedundancy(lr=[0.0, 0.9, 0.8, 0.5, 0.0], attn_cos=[], mlp_cos=[], position_cos=[],
                                         window_cos=[], histogram=[], n_tokens=1, n_windows=1, seqlen=1,
                                         data_label="t"), 5, 2, "lr") == [1, 2]
    assert choose_iteratively(rank, 5, 2) == [1, 3]
    assert calls == [[], [1]]
    with pytest.raises(DropError, match="Only 3 layers"):
        choose_iteratively(rank, 5, 4)


def test_sensitivity_ranking_drops_the_cheapest_first():
    assert top_ranked(sensitivity_ranking([0.5, 0.01, 0.3, 0.02, 9.0]), [1, 2, 3], 2) == [1, 3]
