"""Decoder layers with residual shortcut matrices, model rebuild, save and load.

After SliceGPT, the residual stream changes basis (and width) twice per
layer, so the plain ``residual + block(x)`` of a Hugging Face decoder layer
becomes ``residual @ S + block(x)`` with a shortcut matrix ``S``:

    mid = x @ attn_shortcut + attention(norm(x))     x: [..., d_in]   -> mid: [..., d_mid]
    out = mid @ mlp_shortcut + mlp(norm(mid))        mid: [..., d_mid] -> out: [..., d_out]

``attn_shortcut`` is ``Q_inᵀ Q_mid`` ``[d_in, d_mid]`` and ``mlp_shortcut`` is
``Q_midᵀ Q_out`` ``[d_mid, d_out]`` (sliced).  A shortcut of ``None`` is the
identity.  A layer with parallel blocks (Phi-2) has one shortcut
``Q_inᵀ Q_out`` ``[d_in, d_out]`` in ``attn_shortcut``:

    out = x @ attn_shortcut + attention(norm(x)) + mlp(norm(x))

A block's update is multiplied by the layer's residual multiplier where the
architecture names one (Granite), and an MLP that is no submodule (OPT) is
run as its ``mlp_steps``.

The sliced layer *is* the Hugging Face layer with its class switched to a
subclass (``Sliced<LayerClass>``) whose ``forward`` adds the shortcuts: the
module tree, the attribute names (state-dict keys), ``isinstance`` checks
used by transformers' output capture, and the call signature are all kept.
Which submodule is the norm, the attention, the MLP comes from the
:class:`~engine.architectures.Architecture` table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from engine.core.architectures import Architecture, architecture_of, get_submodule
from engine.core.paths import atomic_folder
from engine.slicing.rotation import fuse_norms, set_linear_weight, untie_head

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "slicing.json"
FORMAT = "layerlab-sliced"
FORMAT_VERSION = 1


class SlicedModelError(ValueError):
    """A saved sliced model cannot be read back; the message says why."""


# ---------------------------------------------------------------- wiring


@dataclass(frozen=True)
class LayerWidths:
    """Residual widths (dimensions) around one sliced decoder layer."""

    d_in: int  # width of the layer's input (attention input, attention shortcut rows)
    d_mid: int  # width between attention and MLP (MLP input)
    d_out: int  # width of the layer's output (next layer's input, or the head's)


def layer_widths(dims: list[int], hidden_size: int) -> list[LayerWidths]:
    """Wiring of docs/methods.md §2 step 4 for per-layer dims ``d_0 .. d_{L-1}``.

    The embedding writes ``d_0``; layer ``i`` reads ``d_i``, keeps ``d_i``
    between attention and MLP and writes ``d_{i+1}``; the last layer writes the
    full ``hidden_size`` so the head reads an unsliced (rotated) stream.
    """
    return [
        LayerWidths(d, d, dims[i + 1] if i + 1 < len(dims) else hidden_size)
        for i, d in enumerate(dims)
    ]


# ---------------------------------------------------------------- layer module


def _shortcut(hidden_states: torch.Tensor, matrix: torch.Tensor | None) -> torch.Tensor:
    return hidden_states if matrix is None else hidden_states @ matrix


class SlicedLayerMixin:
    """Forward of a decoder layer whose residual stream changes basis (see module doc).

    Mixed in front of the Hugging Face decoder-layer class; expects the
    attributes ``slicing_architecture``, ``attn_shortcut`` and ``mlp_shortcut``
    set by :func:`make_sliced_layer`.
    """

    slicing_architecture: Architecture

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``[batch, seq, d_in]`` -> ``[batch, seq, d_out]``; same signature as transformers 5 layers."""
        if self.slicing_architecture.parallel_blocks:
            return self.parallel_forward(
                hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=past_key_values, use_cache=use_cache, position_embeddings=position_embeddings,
                **kwargs,
            )
        mid = self.attention_half(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        return self.mlp_half(mid)

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        multiplier = self.slicing_architecture.residual_multiplier
        return update if multiplier is None else update * getattr(self, multiplier)

    def _attention_update(self, normed: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        arch = self.slicing_architecture
        update, _ = get_submodule(self, arch.attention)(hidden_states=normed, **attention_kwargs)
        if arch.attn_residual_dropout:
            update = get_submodule(self, arch.attn_residual_dropout)(update)
        return self._scaled(update)

    def _mlp_update(self, normed: torch.Tensor) -> torch.Tensor:
        arch = self.slicing_architecture
        if arch.mlp:
            update = get_submodule(self, arch.mlp)(normed)
        else:
            update = normed
            for step in arch.mlp_steps:
                update = get_submodule(self, step)(update)
        if arch.mlp_residual_dropout:
            update = get_submodule(self, arch.mlp_residual_dropout)(update)
        return self._scaled(update)

    def attention_half(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        """Residual after attention: ``[..., d_in]`` -> ``[..., d_mid]``."""
        residual = _shortcut(hidden_states, self.attn_shortcut)
        normed = get_submodule(self, self.slicing_architecture.attn_norm)(hidden_states)
        return residual + self._attention_update(normed, **attention_kwargs)

    def mlp_half(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Residual after the MLP: ``[..., d_mid]`` -> ``[..., d_out]``."""
        residual = _shortcut(hidden_states, self.mlp_shortcut)
        normed = get_submodule(self, self.slicing_architecture.mlp_norm)(hidden_states)
        return residual + self._mlp_update(normed)

    def parallel_forward(self, hidden_states: torch.Tensor, **attention_kwargs) -> torch.Tensor:
        """Parallel blocks on one normed input (Phi-2): ``[..., d_in]`` -> ``[..., d_out]``."""
        residual = _shortcut(hidden_states, self.attn_shortcut)
        normed = get_submodule(self, self.slicing_architecture.attn_norm)(hidden_states)
        return residual + self._attention_update(normed, **attention_kwargs) + self._mlp_update(normed)


_SLICED_CLASSES: dict[type, type] = {}


def sliced_layer_class(base: type) -> type:
    """The ``Sliced<Base>`` subclass of a decoder-layer class (created once, cached)."""
    if issubclass(base, SlicedLayerMixin):
        return base
    if base not in _SLICED_CLASSES:
        _SLICED_CLASSES[base] = type(f"Sliced{base.__name__}", (SlicedLayerMixin, base), {"__module__": __name__})
    return _SLICED_CLASSES[base]


def make_sliced_layer(layer: nn.Module, architecture: Architecture) -> nn.Module:
    """Switch ``layer`` (in place) to its sliced class, with identity shortcuts."""
    if not isinstance(layer, SlicedLayerMixin):
        layer.__class__ = sliced_layer_class(type(layer))
        layer.register_parameter("attn_shortcut", None)
        layer.register_parameter("mlp_shortcut", None)
    layer.slicing_architecture = architecture
    return layer


def set_shortcut(layer: nn.Module, name: str, matrix: torch.Tensor, like: torch.Tensor) -> None:
    """Set ``layer.<name>`` (``attn_shortcut`` / ``mlp_shortcut``) to ``matrix``, in ``like``'s dtype and device."""
    value = matrix.to(like.device, like.dtype).contiguous()
    setattr(layer, name, nn.Parameter(value, requires_grad=False))


# ---------------------------------------------------------------- rebuild


def _empty_linear(linear: nn.Linear, out_features: int, in_features: int) -> None:
    like = linear.weight
    weight = torch.empty(out_features, in_features, dtype=like.dtype, device=like.device)
    bias = None
    if linear.bias is not None:
        bias = torch.empty(out_features, dtype=linear.bias.dtype, device=like.device)
    set_linear_weight(linear, weight, bias)


def _shape_layer(layer: nn.Module, arch: Architecture, widths: LayerWidths) -> None:
    parallel = arch.parallel_blocks  # attention and MLP both read d_in and write d_out
    for path in arch.attn_inputs:
        linear = get_submodule(layer, path)
        _empty_linear(linear, linear.out_features, widths.d_in)
    out = get_submodule(layer, arch.attn_output)
    _empty_linear(out, widths.d_out if parallel else widths.d_mid, out.in_features)
    for path in arch.mlp_inputs:
        linear = get_submodule(layer, path)
        _empty_linear(linear, linear.out_features, widths.d_in if parallel else widths.d_mid)
    down = get_submodule(layer, arch.mlp_output)
    _empty_linear(down, widths.d_out, down.in_features)
    make_sliced_layer(layer, arch)
    like = out.weight
    if parallel:
        set_shortcut(layer, "attn_shortcut", torch.empty(widths.d_in, widths.d_out), like)
        return
    set_shortcut(layer, "attn_shortcut", torch.empty(widths.d_in, widths.d_mid), like)
    set_shortcut(layer, "mlp_shortcut", torch.empty(widths.d_mid, widths.d_out), like)


def shape_sliced_model(model: nn.Module, architecture: Architecture, dims: list[int]) -> nn.Module:
    """Give a dense model (in place) the module structure and tensor shapes of a sliced one.

    Weights are left uninitialised: load a sliced state dict afterwards.
    """
    embedding = get_submodule(model, architecture.embedding)
    hidden_size = int(embedding.weight.shape[1])
    untie_head(model, architecture)
    fuse_norms(model, architecture, hidden_size, fold=False)
    for path in (architecture.embedding, *architecture.extra_embeddings):
        table = get_submodule(model, path)
        like = table.weight
        table.weight = nn.Parameter(torch.empty(like.shape[0], dims[0], dtype=like.dtype, device=like.device))
        table.embedding_dim = dims[0]
    for layer, widths in zip(architecture.decoder_layers(model), layer_widths(dims, hidden_size)):
        _shape_layer(layer, architecture, widths)
    return model


# ---------------------------------------------------------------- save / load


def save_sliced_folder(model: nn.Module, folder: str | Path, meta: dict, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` (state dict) and ``slicing.json`` (``meta`` + base config).

    ``meta`` must hold ``dims`` (list of ints) and ``dtype`` (e.g. ``"float32"``);
    anything else JSON-serialisable is kept as is.  Returns the folder.
    """
    folder = Path(folder)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_type": model.config.model_type,
        "base_config": model.config.to_dict(),
        **meta,
    }
    with atomic_folder(folder, overwrite) as staging:  # an interrupted save leaves no half-written model
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))
    return folder


def read_sliced_config(folder: str | Path) -> dict:
    """The ``slicing.json`` of a saved sliced model, checked for format and files."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise SlicedModelError(
            f"'{folder}' is not a saved sliced model: it needs {CONFIG_FILE} and {WEIGHTS_FILE}. "
            "Save one with engine.slicing.save_sliced."
        )
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise SlicedModelError(f"{config_path} is not valid JSON ({err}).") from None
    if config.get("format") != FORMAT or config.get("format_version") != FORMAT_VERSION:
        raise SlicedModelError(
            f"{config_path} is not a {FORMAT} v{FORMAT_VERSION} file "
            f"(found {config.get('format')!r} v{config.get('format_version')!r})."
        )
    return config


def load_sliced_folder(folder: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild a saved sliced model from its base config and dims, then load its weights.

    Needs no original weights.  Returns ``(model in eval mode, slicing.json dict)``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = read_sliced_config(folder)
    base = dict(config["base_config"])
    base.pop("model_type", None)
    base["tie_word_embeddings"] = False
    hf_config = AutoConfig.for_model(config["model_type"], **base)
    dtype = getattr(torch, config["dtype"])
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    architecture = architecture_of(model)
    shape_sliced_model(model, architecture, [int(d) for d in config["dims"]])
    state = load_file(str(folder / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise SlicedModelError(f"The weights in {folder / WEIGHTS_FILE} do not fit the saved dims: {err}") from None
    return model.to(device).eval(), config
