"""Where each architecture keeps its parts.

An :class:`Architecture` holds dotted attribute paths from the causal-LM
object to its embedding, decoder layers, norms, attention and MLP linears,
final norm and head.  Every other module asks it instead of testing
``model_type``.

Two sources: the table ``ARCHITECTURES`` (explicit entries, kept only where
discovery needs help, e.g. OPT's MLP that is no submodule) and
:mod:`engine.core.discovery`, which reads the same facts off the module tree
of any other decoder-only causal LM.  :func:`architecture_of` picks one for a
model; :func:`architecture_for` looks up the table alone.  Features a model's
layout cannot support are listed in :attr:`Architecture.unavailable` with the
reason (the other features keep working).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch
from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model has no table entry and its layout cannot be discovered; the message says what was found."""


class Feature(StrEnum):
    """What a model's layout may not support: the keys of :attr:`Architecture.unavailable`."""

    SUBLAYER = "sublayer"
    QUANTIZATION = "quantization"
    GPTQ = "gptq"
    DROP_ATTENTION = "drop-attention"
    DROP_MLP = "drop-mlp"
    SLICING = "slicing"


FEATURES = {  # feature -> what it is, in the words of the message shown to the user
    Feature.SUBLAYER: "attention / MLP sublayer cosines",
    Feature.QUANTIZATION: "layer-wise quantization (RTN)",
    Feature.GPTQ: "GPTQ quantization",
    Feature.DROP_ATTENTION: "dropping attention blocks",
    Feature.DROP_MLP: "dropping MLP blocks",
    Feature.SLICING: "slicing (SliceGPT)",
}
METHOD_FEATURES = (Feature.QUANTIZATION, Feature.GPTQ, Feature.SLICING, Feature.DROP_ATTENTION, Feature.DROP_MLP)
"""Features that are compression methods (offered instead when one is unavailable); dropping whole layers
works on every model."""


@dataclass(frozen=True)
class Architecture:
    """Attribute paths of one decoder-only architecture.

    Paths under ``model`` start at the causal-LM object; paths under a layer
    start at one decoder layer.  ``norm_eps_attr`` names the epsilon attribute
    of the norm modules; ``attn_residual_dropout`` / ``mlp_residual_dropout``
    name dropouts a layer applies to a block's output before adding it to the
    residual (``None`` if it has none).  ``linears`` maps a short display name
    (``"q"``, ``"gate"``, ...) to the path of that linear inside a layer, in
    the order they run.
    """

    model_type: str
    linears: dict[str, str]
    attn_inputs: tuple[str, ...]
    mlp_inputs: tuple[str, ...]
    attn_output: str = "self_attn.o_proj"
    mlp_output: str = "mlp.down_proj"
    embedding: str = "model.embed_tokens"
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    head: str = "lm_head"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    attention: str = "self_attn"
    mlp: str = "mlp"
    norm_kind: str = "rms"
    norm_eps_attr: str = "variance_epsilon"
    attn_residual_dropout: str | None = None
    mlp_residual_dropout: str | None = None
    source: str = "table"
    extra_embeddings: tuple[str, ...] = ()
    parallel_blocks: bool = False
    mlp_steps: tuple[str, ...] = ()
    residual_multiplier: str | None = None
    unavailable: dict[str, str] = field(default_factory=dict)

    # Further fields: ``source`` is ``"table"`` or ``"discovered"``;
    # ``extra_embeddings`` are other embeddings added to the token embedding
    # (OPT's learned positions), rotated with it when slicing;
    # ``parallel_blocks``: attention and MLP read the same normed input and
    # both add to the residual (Phi-2; ``mlp_norm`` is then ``attn_norm``);
    # ``mlp_steps``: when ``mlp`` is ``""`` the MLP is these layer attributes
    # applied in order (OPT: ``fc1``, ``activation_fn``, ``fc2``);
    # ``residual_multiplier``: a layer attribute (float) multiplying each
    # block's output before the residual add (Granite); ``unavailable``:
    # feature key (:data:`FEATURES`) -> why this model cannot do it.

    def reason(self, feature: str) -> str | None:
        """Why ``feature`` (a :data:`FEATURES` key) is unavailable for this model, or ``None`` if it works."""
        return self.unavailable.get(feature)

    def unavailable_message(self, feature: str) -> str | None:
        """A plain sentence for a user: why ``feature`` cannot run on this model and what does; ``None`` if it
        works."""
        why = self.reason(feature)
        if why is None:
            return None
        working = [FEATURES[key] for key in METHOD_FEATURES if key != feature and self.reason(key) is None]
        return (f"{FEATURES[feature][0].upper()}{FEATURES[feature][1:]} is not available for this model "
                f"({self.model_type}): {why} What works for it: {', '.join(working) or 'the scores only'}.")

    def with_unavailable(self, unavailable: dict[str, str]) -> Architecture:
        """A copy with ``unavailable`` replaced."""
        return replace(self, unavailable=dict(unavailable))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order."""
        return get_submodule(model, self.layers)

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Short name -> linear module of one decoder layer (a block dropped from the layer has none)."""
        found = {}
        for name, path in self.linears.items():
            try:
                found[name] = resolve_linear(layer, path)
            except (AttributeError, IndexError):
                continue
        return found

    def linear_paths(self, n_layers: int) -> dict[str, tuple[int, str]]:
        """Module path of every decoder-layer linear -> ``(layer, short name)``, e.g.
        ``"model.layers.0.self_attn.q_proj" -> (0, "q")`` (add ``.weight`` for the state-dict key)."""
        return {f"{self.layers}.{i}.{path}": (i, short)
                for i in range(n_layers) for short, path in self.linears.items()}

    @property
    def linear_names(self) -> list[str]:
        """Short names of a layer's linears (heatmap columns)."""
        return list(self.linears)


def get_submodule(root: nn.Module, dotted_path: str) -> nn.Module:
    """Follow a dotted attribute path such as ``model.layers`` from ``root``."""
    module = root
    for part in dotted_path.split("."):
        module = getattr(module, part)
    return module


class ExpertLinear:
    """One expert of a fused mixture-of-experts tensor, seen as a linear layer.

    Transformers 5 stores a layer's experts as one parameter ``[E, out, in]``
    (e.g. Mixtral's ``experts.gate_up_proj``); expert ``e`` computes
    ``x @ parameter[e].T``.  ``weight`` is the ``[out, in]`` view of that
    expert (writing into it writes the fused tensor), so weight-only code
    (ZD, RTN, size accounting) treats it like an ``nn.Linear``.  It is not a
    module: it cannot carry forward hooks (GPTQ needs them).
    """

    def __init__(self, parameter: nn.Parameter, index: int) -> None:
        self.parameter = parameter
        self.index = int(index)

    @property
    def weight(self) -> torch.Tensor:
        """``[out, in]`` view of expert ``index`` (shares memory with the fused parameter)."""
        return self.parameter.data[self.index]

    @property
    def bias(self) -> None:
        return None

    @property
    def in_features(self) -> int:
        return int(self.parameter.shape[2])

    @property
    def out_features(self) -> int:
        return int(self.parameter.shape[1])

    def register_forward_pre_hook(self, *_args, **_kwargs):
        """Refuse: an expert of a fused tensor never runs as a module, so its inputs cannot be hooked (GPTQ)."""
        raise UnsupportedArchitectureError(
            "GPTQ hooks each linear's inputs, and this model's experts are fused 3-D tensors with no per-expert "
            "module: quantize it with RTN."
        )


_EXPERT_PATH = re.compile(r"^(?P<path>.+)\[(?P<index>\d+)\]$")


def resolve_linear(layer: nn.Module, path: str) -> nn.Linear | ExpertLinear:
    """The linear at ``path`` inside ``layer``; ``"mlp.experts.down_proj[3]"`` is expert 3 of a fused tensor."""
    match = _EXPERT_PATH.match(path)
    if match is None:
        return get_submodule(layer, path)
    parent, _, name = match["path"].rpartition(".")
    owner = get_submodule(layer, parent) if parent else layer
    parameter = getattr(owner, name)
    if not isinstance(parameter, torch.Tensor) or parameter.dim() != 3:
        raise AttributeError(f"'{match['path']}' is not a fused expert tensor [experts, out, in].")
    index = int(match["index"])
    if index >= parameter.shape[0]:
        raise IndexError(f"'{match['path']}' has {parameter.shape[0]} experts, not {index + 1}.")
    return ExpertLinear(parameter, index)


_SEPARATE_LINEARS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}


def _llama_like(model_type: str) -> Architecture:
    return Architecture(
        model_type=model_type,
        linears=dict(_SEPARATE_LINEARS),
        attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    )


# OPT's MLP is no submodule (fc1 -> activation -> fc2 sit on the layer), so
# discovery cannot tell its order: it needs a table entry.
_OPT = Architecture(
    model_type="opt",
    linears={
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": "self_attn.out_proj",
        "fc1": "fc1",
        "fc2": "fc2",
    },
    attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    mlp_inputs=("fc1",),
    attn_output="self_attn.out_proj",
    mlp_output="fc2",
    embedding="model.decoder.embed_tokens",
    layers="model.decoder.layers",
    final_norm="model.decoder.final_layer_norm",
    attn_norm="self_attn_layer_norm",
    mlp_norm="final_layer_norm",
    mlp="",
    mlp_steps=("fc1", "activation_fn", "fc2"),
    norm_kind="layer",
    norm_eps_attr="eps",
    extra_embeddings=("model.decoder.embed_positions",),
)

ARCHITECTURES: dict[str, Architecture] = {
    "opt": _OPT,
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "phi3": Architecture(
        model_type="phi3",
        linears={
            "qkv": "self_attn.qkv_proj",
            "o": "self_attn.o_proj",
            "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj",
        },
        attn_inputs=("self_attn.qkv_proj",),
        mlp_inputs=("mlp.gate_up_proj",),
        attn_residual_dropout="resid_attn_dropout",
        mlp_residual_dropout="resid_mlp_dropout",
    ),
}


def supported_model_types() -> list[str]:
    """Model types with an explicit table entry (others are discovered from the module tree)."""
    return sorted(ARCHITECTURES)


def architecture_for(model_type: str) -> Architecture:
    """The table entry for ``model_type`` (no model needed); raises if the table has none.

    Use :func:`architecture_of` when the model is at hand: it also discovers
    architectures the table does not list.
    """
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' has no table entry (table: {', '.join(supported_model_types())}); "
            "other decoder-only causal LMs are discovered from the loaded model's module tree."
        ) from None


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture of ``model``: its table entry, else discovered from its module tree.

    Either way, :attr:`Architecture.unavailable` is filled in for this model
    (e.g. slicing refused for a layout without computational invariance).
    Raises :class:`UnsupportedArchitectureError` naming what was found when no
    decoder-layer stack can be identified.
    """
    from engine.core.discovery import discover_architecture, table_architecture

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in ARCHITECTURES:
        return table_architecture(model, ARCHITECTURES[model_type])
    return discover_architecture(model)
