# Modeling file written by LayerLab next to an exported model (``trust_remote_code=True``).
#
# It needs only torch and transformers: no LayerLab import.  The model is the
# family's own transformers class (imported on the line marked "family" below,
# which LayerLab writes for each export) with three changes read from
# ``config.layerlab_variant`` and applied right after the family builds its
# dense module tree, before the weights are loaded:
#
# - ``tensor_shapes``: parameters whose shape differs from the dense model
#   (sliced linears and embeddings) are re-created with the recorded shape;
#   ``[out, in]`` for weights, ``[out]`` for biases (a bias listed here is
#   added where the dense model had none);
# - ``weightless_norms``: norms replaced by RMSNorm without a scale that
#   divides by the *original* hidden size (SliceGPT folds norm scales into the
#   linears that read them);
# - ``skipped``: attention or MLP blocks removed from a layer (they add
#   nothing to the residual stream; their norm is removed too);
# - ``shortcuts``: decoder layers whose residual stream changes basis get the
#   matrices ``attn_shortcut [d_in, d_mid]`` and ``mlp_shortcut [d_mid, d_out]``
#   (one ``attn_shortcut [d_in, d_out]`` for parallel attention + MLP blocks):
#       mid = x @ attn_shortcut + attention(norm(x))
#       out = mid @ mlp_shortcut + mlp(norm(mid))
#
# Attribute paths (which submodule is the norm, the attention, the MLP) are in
# ``config.layerlab_variant["paths"]``.

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM as FamilyForCausalLM  # family


def _module(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_module(root, parent) if parent else root, name, module)


class WeightlessRMSNorm(nn.Module):
    """``y = x / sqrt(sum(x^2) / mean_dim + eps)`` over the last axis, in fp32, cast back."""

    def __init__(self, mean_dim: int, eps: float) -> None:
        super().__init__()
        self.mean_dim = int(mean_dim)
        self.eps = float(eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.to(torch.float32)
        mean_square = x.pow(2).sum(-1, keepdim=True) / self.mean_dim
        return (x * torch.rsqrt(mean_square + self.eps)).to(hidden_states.dtype)


class SkippedBlock(nn.Module):
    """A removed attention (returns ``(zeros, None)``) or MLP block (returns zeros)."""

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.attention else out


class ShortcutLayerMixin:
    """Decoder-layer forward with residual shortcut matrices (see the file header)."""

    layerlab_paths: dict

    def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        p = self.layerlab_paths
        attention_kwargs = dict(attention_mask=attention_mask, position_ids=position_ids,
                                past_key_values=past_key_values, use_cache=use_cache,
                                position_embeddings=position_embeddings, **kwargs)
        residual = hidden_states if self.attn_shortcut is None else hidden_states @ self.attn_shortcut
        normed = _module(self, p["attn_norm"])(hidden_states)
        if p["parallel_blocks"]:
            return residual + self._attention(normed, attention_kwargs) + self._mlp(normed)
        mid = residual + self._attention(normed, attention_kwargs)
        residual = mid if self.mlp_shortcut is None else mid @ self.mlp_shortcut
        return residual + self._mlp(_module(self, p["mlp_norm"])(mid))

    def _scaled(self, update: torch.Tensor) -> torch.Tensor:
        multiplier = self.layerlab_paths.get("residual_multiplier")
        return update if not multiplier else update * getattr(self, multiplier)

    def _attention(self, normed: torch.Tensor, attention_kwargs: dict) -> torch.Tensor:
        p = self.layerlab_paths
        update, _ = _module(self, p["attention"])(hidden_states=normed, **attention_kwargs)
        if p.get("attn_residual_dropout"):
            update = _module(self, p["attn_residual_dropout"])(update)
        return self._scaled(update)

    def _mlp(self, normed: torch.Tensor) -> torch.Tensor:
        p = self.layerlab_paths
        if p["mlp"]:
            update = _module(self, p["mlp"])(normed)
        else:
            update = normed
            for step in p["mlp_steps"]:
                update = _module(self, step)(update)
        if p.get("mlp_residual_dropout"):
            update = _module(self, p["mlp_residual_dropout"])(update)
        return self._scaled(update)


_SHORTCUT_CLASSES: dict[type, type] = {}


def _shortcut_class(base: type) -> type:
    if base not in _SHORTCUT_CLASSES:
        _SHORTCUT_CLASSES[base] = type(f"Shortcut{base.__name__}", (ShortcutLayerMixin, base), {})
    return _SHORTCUT_CLASSES[base]


def apply_variant(model: nn.Module, variant: dict) -> None:
    """Give a freshly built dense model the module tree and shapes recorded in ``variant`` (weights come later)."""
    paths = variant["paths"]
    like = _module(model, paths["embedding"]).weight
    for name, shape in variant.get("tensor_shapes", {}).items():
        owner_path, _, attr = name.rpartition(".")
        owner = _module(model, owner_path)
        setattr(owner, attr, nn.Parameter(torch.empty(shape, dtype=like.dtype, device=like.device),
                                          requires_grad=False))
        if isinstance(owner, nn.Linear) and attr == "weight":
            owner.out_features, owner.in_features = int(shape[0]), int(shape[1])
        if isinstance(owner, nn.Embedding) and attr == "weight":
            owner.embedding_dim = int(shape[1])
    for path, (mean_dim, eps) in variant.get("weightless_norms", {}).items():
        _replace(model, path, WeightlessRMSNorm(mean_dim, eps))
    layers = _module(model, paths["layers"])
    for block, indices in variant.get("skipped", {}).items():
        for i in indices:
            block_path = paths["attention"] if block == "attention" else paths["mlp"]
            norm_path = paths["attn_norm"] if block == "attention" else paths["mlp_norm"]
            _replace(layers[i], block_path, SkippedBlock(attention=block == "attention"))
            _replace(layers[i], norm_path, nn.Identity())
    for index, shapes in variant.get("shortcuts", {}).items():
        layer = layers[int(index)]
        layer.__class__ = _shortcut_class(type(layer))
        layer.layerlab_paths = paths
        for name in ("attn_shortcut", "mlp_shortcut"):
            shape = shapes.get(name)
            value = None if shape is None else nn.Parameter(
                torch.empty(shape, dtype=like.dtype, device=like.device), requires_grad=False)
            layer.register_parameter(name, value)


class LayerLabForCausalLM(FamilyForCausalLM):
    """The family's causal LM with LayerLab's recorded changes (sliced widths, removed blocks)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        apply_variant(self, config.layerlab_variant)
