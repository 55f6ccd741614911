"""Hugging Face folders that plain transformers loads, for dropped and sliced models.

- A model whose changes transformers can express (whole decoder layers
  removed, or nothing changed) is written with ``save_pretrained``: config,
  safetensors, tokenizer.  ``AutoModelForCausalLM.from_pretrained(folder)``
  loads it with no extra code.
- A sliced model (per-layer residual widths, shortcut matrices, weightless
  norms) or one with attention / MLP blocks removed gets, in addition, the
  modeling file ``modeling_layerlab.py`` (:mod:`engine.export.remote_modeling`,
  with its import line set to the model's family class) and
  ``config.layerlab_variant`` recording the changes; it loads with
  ``from_pretrained(folder, trust_remote_code=True)``.

The variant is read off the compressed model itself by comparing it with the
dense module tree its config builds (on the meta device: no memory), so any
family that slicing or dropping supports exports the same way.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from torch import nn

from engine.core.architectures import Architecture, get_submodule
from engine.core.paths import atomic_folder

MODELING_FILE = "modeling_layerlab.py"
REMOTE_CLASS = "LayerLabForCausalLM"
WEIGHTS_FILE = "model.safetensors"
_TEMPLATE = Path(__file__).with_name("remote_modeling.py")
_FAMILY_LINE = "from transformers import LlamaForCausalLM as FamilyForCausalLM  # family"


class ExportError(ValueError):
    """An export cannot be written as asked; the message says why and what to do."""


def _dense_twin(model: nn.Module) -> nn.Module:
    """The dense model its config describes, built on the meta device (shapes only, no memory)."""
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


def variant_of(model: nn.Module, architecture: Architecture) -> dict:
    """What ``model`` changes against the dense model of its config (``config.layerlab_variant``).

    Empty ``tensor_shapes`` / ``weightless_norms`` / ``skipped`` / ``shortcuts``
    mean the model is an ordinary checkpoint of its family.
    """
    from engine.dropping.drop_model import SkippedBlock
    from engine.slicing.rotation import WeightlessRMSNorm

    dense = _dense_twin(model)
    dense_params = dict(dense.named_parameters(remove_duplicate=False))
    shapes = {}
    for name, tensor in model.named_parameters(remove_duplicate=False):
        if name.endswith(("attn_shortcut", "mlp_shortcut")):
            continue
        if name not in dense_params or tuple(dense_params[name].shape) != tuple(tensor.shape):
            shapes[name] = list(tensor.shape)
    norms = {name: [module.mean_dim, module.eps] for name, module in model.named_modules()
             if isinstance(module, WeightlessRMSNorm)}
    skipped: dict[str, list[int]] = {"attention": [], "mlp": []}
    shortcuts: dict[str, dict] = {}
    for index, layer in enumerate(architecture.decoder_layers(model)):
        for block, path in (("attention", architecture.attention), ("mlp", architecture.mlp)):
            if path and isinstance(get_submodule(layer, path), SkippedBlock):
                skipped[block].append(index)
        if hasattr(layer, "attn_shortcut"):
            shortcuts[str(index)] = {
                name: None if getattr(layer, name, None) is None else list(getattr(layer, name).shape)
                for name in ("attn_shortcut", "mlp_shortcut")
            }
    paths = {key: getattr(architecture, key) for key in (
        "embedding", "layers", "attn_norm", "mlp_norm", "attention", "mlp", "parallel_blocks",
        "residual_multiplier", "attn_residual_dropout", "mlp_residual_dropout")}
    paths["mlp_steps"] = list(architecture.mlp_steps)
    return {"format": "layerlab-variant", "version": 1, "paths": paths, "tensor_shapes": shapes,
            "weightless_norms": norms, "skipped": {k: v for k, v in skipped.items() if v},
            "shortcuts": shortcuts}


def needs_remote_code(variant: dict) -> bool:
    """Whether plain transformers cannot build this model without LayerLab's modeling file."""
    return any(variant[key] for key in ("tensor_shapes", "weightless_norms", "skipped", "shortcuts"))


def modeling_source(model: nn.Module) -> str:
    """The text of ``modeling_layerlab.py`` for ``model``'s family (its class imported from transformers)."""
    family = type(model).__name__
    if not hasattr(transformers, family):
        raise ExportError(f"{family} is not importable from transformers, so the exported modeling file could not "
                          "subclass it; export is supported for families that ship with transformers.")
    text = _TEMPLATE.read_text()
    if _FAMILY_LINE not in text:
        raise ExportError("engine/export/remote_modeling.py lost its family import line.")  # a LayerLab bug
    return text.replace(_FAMILY_LINE, f"from transformers import {family} as FamilyForCausalLM  # family")


def saved_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict's tensors a checkpoint holds, as they are: a head tied to the embedding is left out (for
    transformers to re-tie)."""
    state = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen and tensor.numel() > 0:
            continue  # a tied copy (e.g. lm_head.weight = embed_tokens.weight)
        seen.add(key)
        state[name] = tensor
    return state


def tensors_to_save(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Tensors to save (CPU, contiguous, floats cast to ``dtype`` if given), as :func:`saved_tensors` picks them."""
    state = {}
    for name, tensor in saved_tensors(model).items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor.contiguous()
    return state


def write_hf_folder(model: nn.Module, architecture: Architecture, folder: str | Path, tokenizer=None,
                    overwrite: bool = False, notes: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write ``model`` as a Hugging Face folder (weights in ``dtype``, default: the model's); returns what was written.

    Returns ``{"folder", "remote_code" (bool), "files": [names], "bytes", "weights_bytes"}`` (the whole folder;
    its ``*.safetensors`` files).
    The folder is staged and renamed at the end (never half-written);
    ``notes`` (JSON) is kept as ``layerlab_export.json``.
    """
    folder = Path(folder)
    variant = variant_of(model, architecture)
    remote = needs_remote_code(variant)
    config = copy.deepcopy(model.config)
    if dtype is not None:
        config.dtype = dtype
    if remote:
        config.layerlab_variant = variant
        config.auto_map = {"AutoModelForCausalLM": f"{MODELING_FILE.removesuffix('.py')}.{REMOTE_CLASS}"}
        config.architectures = [REMOTE_CLASS]
    with atomic_folder(folder, overwrite) as staging:
        if remote:
            (staging / MODELING_FILE).write_text(modeling_source(model))
            save_file(tensors_to_save(model, dtype), str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(staging)
        else:  # an ordinary checkpoint of its family (transformers applies its own key conversions)
            model.save_pretrained(staging, safe_serialization=True,
                                  state_dict=tensors_to_save(model, dtype) if dtype is not None else None)
        config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        (staging / "layerlab_export.json").write_text(json.dumps(notes or {}, indent=2, default=str))
    files = sorted(p.name for p in folder.iterdir())
    return {"folder": str(folder), "remote_code": remote, "files": files, "bytes": folder_bytes(folder),
            "weights_bytes": folder_bytes(folder, "*.safetensors")}


def folder_bytes(folder: str | Path, pattern: str = "*") -> int:
    """Bytes on disk of every file under ``folder`` (``pattern``: only those, e.g. ``"*.safetensors"``: the
    weights, without the tokenizer and config)."""
    return sum(p.stat().st_size for p in Path(folder).rglob(pattern) if p.is_file())


def load_hf_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load an exported folder the way a user would (``trust_remote_code`` only where the folder needs it)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    remote = "layerlab_variant" in config
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, trust_remote_code=remote).eval()
