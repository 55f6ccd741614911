"""A dropped model: a real smaller model (modules removed, not zeroed), built from a copy of the base.

- ``block="layer"``: the chosen decoder layers are removed from the layer
  list; the config's layer count (and per-layer lists such as
  ``layer_types``) and every attention module's ``layer_idx`` are renumbered,
  so generation caches line up.  It is an ordinary checkpoint of the same
  family with fewer layers.
- ``block="attention"`` / ``"mlp"``: the block and the norm that feeds it are
  replaced by parameter-free stand-ins that add nothing to the residual
  stream (the block's output is zeros), so its weights are really gone.

The base model is never modified: the dropped model is a new module tree
(:func:`~engine.core.sharing.shell_copy`) over the base's own tensors, so it
costs almost no memory; only modules are removed or replaced, never a weight
written.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine.core.architectures import Architecture, Feature, architecture_of, get_submodule
from engine.core.models import LoadedModel
from engine.core.paths import atomic_folder
from engine.core.sharing import shell_copy
from engine.dropping.choose import DropError, check_drop

INFO_FILE = "dropping.json"


class SkippedBlock(nn.Module):
    """Stands in for a removed attention or MLP block: adds nothing to the residual (no parameters).

    Attention blocks return ``(output, weights)`` in transformers; ``attention=True`` keeps that shape.
    """

    def __init__(self, attention: bool) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.attention else out


@dataclass(frozen=True)
class DropReport:
    """What was dropped and the sizes before and after (parameter counts)."""

    block: str
    layers: list[int]
    params_dense: int
    params_dropped: int

    @property
    def param_ratio(self) -> float:
        return self.params_dropped / self.params_dense

    def to_dict(self) -> dict:
        return {**asdict(self), "param_ratio": self.param_ratio}


@dataclass
class DroppedModel:
    """The smaller model, its architecture and what was dropped."""

    model: nn.Module
    architecture: Architecture
    report: DropReport


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent) if parent else root, name, module)


def _remove_layers(model: nn.Module, arch: Architecture, drop: list[int]) -> None:
    layers = arch.decoder_layers(model)
    kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
    _set_submodule(model, arch.layers, nn.ModuleList(kept))
    for index, layer in enumerate(kept):
        attention = get_submodule(layer, arch.attention)
        if hasattr(attention, "layer_idx"):
            attention.layer_idx = index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = index
    config = model.config
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == len(layers):
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in set(drop)]
    config.num_hidden_layers = len(kept)


def _skip_blocks(model: nn.Module, arch: Architecture, drop: list[int], block: str) -> None:
    layers = arch.decoder_layers(model)
    for i in drop:
        layer = layers[i]
        if block == "attention":
            _set_submodule(layer, arch.attention, SkippedBlock(attention=True))
            _set_submodule(layer, arch.attn_norm, nn.Identity())
        else:
            _set_submodule(layer, arch.mlp, SkippedBlock(attention=False))
            _set_submodule(layer, arch.mlp_norm, nn.Identity())


def apply_drop(model: nn.Module, arch: Architecture, block: str, layers: list[int]) -> None:
    """Drop ``layers`` (``block`` of each) from ``model`` in place: use on copies only."""
    if block == "layer":
        _remove_layers(model, arch, layers)
    else:
        _skip_blocks(model, arch, layers, block)


def drop_model(base: LoadedModel, block: str, layers: list[int], protect_ends: bool = False) -> DroppedModel:
    """A copy of ``base.model`` without the chosen layers / attention blocks / MLP blocks.

    ``layers``: decoder-layer indices of the dense model.  Dropping nothing gives an exact copy.
    """
    chosen = check_drop(base.num_layers, block, layers, protect_ends)
    refusal = base.architecture.reason(Feature(f"drop-{block}")) if block != "layer" else None
    if refusal and chosen:
        raise DropError(f"{base.architecture.model_type} cannot drop {block} blocks: {refusal}")
    model = shell_copy(base.model).eval()  # the kept layers are the base's own tensors: dropping costs no weights
    apply_drop(model, base.architecture, block, chosen)
    count = sum(p.numel() for p in base.model.parameters())
    report = DropReport(block=block, layers=chosen, params_dense=count,
                        params_dropped=sum(p.numel() for p in model.parameters()))
    return DroppedModel(model, base.architecture, report)


def save_dropped(dropped: DroppedModel, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """A Hugging Face folder (``save_pretrained``) plus ``dropping.json``.

    Whole-layer drops are an ordinary checkpoint with fewer layers that
    ``AutoModelForCausalLM.from_pretrained`` loads as is; block drops need
    :func:`load_dropped` to put the stand-ins back.
    """
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as staging:
        dropped.model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / INFO_FILE).write_text(json.dumps(dropped.report.to_dict(), indent=2))
    return folder


def load_dropped(folder: str | Path, device: str | torch.device = "cpu") -> DroppedModel:
    """Reload a model saved by :func:`save_dropped`."""
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    info = json.loads((folder / INFO_FILE).read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    arch = architecture_of(model)
    if info["block"] != "layer":
        _skip_blocks(model, arch, info["layers"], info["block"])
    report = DropReport(info["block"], info["layers"], info["params_dense"], info["params_dropped"])
    return DroppedModel(model, arch, report)
