"""Where each supported architecture keeps its parts.

One table (``ARCHITECTURES``) maps a Hugging Face ``model_type`` to an
:class:`Architecture`: dotted attribute paths from the causal-LM object to its
embedding, decoder layers, norms, attention and MLP linears, final norm and
head.  Every other module asks this table instead of testing ``model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's ``model_type`` has no entry in :data:`ARCHITECTURES`."""


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

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The model's decoder layers, in order."""
        return get_submodule(model, self.layers)

    def layer_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Short name -> linear module of one decoder layer (a block dropped from the layer has none)."""
        found = {}
        for name, path in self.linears.items():
            try:
                found[name] = get_submodule(layer, path)
            except AttributeError:
                continue
        return found

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


ARCHITECTURES: dict[str, Architecture] = {
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
    """Model types LayerLab can analyse and compress."""
    return sorted(ARCHITECTURES)


def architecture_for(model_type: str) -> Architecture:
    """Look up the adapter for ``model_type`` or explain what is supported."""
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"Architecture '{model_type}' is not supported. "
            f"Supported: {', '.join(supported_model_types())}."
        ) from None
