"""Actions: text forms, labels, and every bad input refused with what to do."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.core.architectures import architecture_for
from engine.sensitivity.actions import Action, check_supported, parse_action, parse_actions
from engine.sensitivity.errors import ActionSpecError, SensitivityError, UnsupportedActionError


def test_text_forms_keys_and_labels():
    actions = parse_actions("quant:3, gptq:4/g64, slice:0.25, drop, drop-attn, drop-mlp, quant:3")
    assert [a.key for a in actions] == ["rtn3-g128", "gptq4-g64", "slice0.25", "drop", "drop-attn", "drop-mlp"]
    assert [a.label for a in actions] == ["RTN 3-bit", "GPTQ 4-bit g64", "slice 25%", "drop layer",
                                          "drop attention", "drop MLP"]
    assert Action.from_dict(actions[1].to_dict()) == actions[1]
    assert actions[1].quantizer().act_order and actions[1].quantizer().propagation == "dense"


@pytest.mark.parametrize("text, message", [
    ("quant:9", "out of range: choose an integer from 2 to 8"),
    ("quant:1", "out of range"),
    ("gptq", "needs an integer bit level"),
    ("quant:3.5", "needs an integer bit level"),
    ("slice:1.2", "between 0 and 1"),
    ("slice:abc", "slicing fraction between 0 and 1"),
    ("drop:2", "takes no value"),
    ("quant:3@", "for one linear"),
    ("prune", "Unknown action 'prune'"),
    ("", "No action given"),
])
def test_bad_actions_are_refused_with_what_to_do(text, message):
    with pytest.raises(ActionSpecError, match=message.replace("(", r"\(")):
        parse_actions(text)


def test_errors_are_value_errors():
    assert issubclass(ActionSpecError, SensitivityError) and issubclass(SensitivityError, ValueError)


def test_slicing_that_rounds_to_nothing_or_everything_is_refused():
    assert Action("slice", fraction=0.25).kept_dims(576) == 432
    with pytest.raises(ActionSpecError, match="nothing is removed"):
        Action("slice", fraction=0.05).kept_dims(64)
    with pytest.raises(ActionSpecError, match="nothing is left"):
        Action("slice", fraction=0.95).kept_dims(64)


def test_an_action_the_architecture_cannot_do_is_refused():
    layer_norm_model = replace(architecture_for("llama"), norm_kind="layer")
    with pytest.raises(UnsupportedActionError, match="RMSNorm"):
        check_supported(parse_action("slice:0.25"), layer_norm_model, 64)
    check_supported(parse_action("quant:3"), layer_norm_model, 64)  # quantizing needs no norm fusion
    no_blocks = replace(architecture_for("llama"), attention="")
    with pytest.raises(UnsupportedActionError, match="drop"):
        check_supported(parse_action("drop-attn"), no_blocks, 64)


def test_one_linear_of_a_layer_as_an_action():
    action = parse_action("quant:3/g64@down")
    assert action == Action("rtn", bits=3, group_size=64, module="down")
    assert action.key == "rtn3-g64-down" and action.label == "RTN 3-bit g64 down"
    assert action.cost_word == "3-bit RTN of down" and Action.from_dict(action.to_dict()) == action
    assert "module" not in parse_action("quant:3").to_dict()  # whole-layer records and cache keys as before
    check_supported(action, architecture_for("llama"), 64)
    with pytest.raises(UnsupportedActionError, match="no linear 'qkv': choose one of q, k, v, o, gate, up, down"):
        check_supported(parse_action("gptq:4@qkv"), architecture_for("llama"), 64)
    with pytest.raises(ActionSpecError, match="takes no module"):
        Action("drop", module="down")
