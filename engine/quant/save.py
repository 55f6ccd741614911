"""Save and load a quantized model: safetensors + JSON only, never pickle.

A saved folder holds
- ``model.safetensors``: every quantized linear as ``<path>.qweight``
  (bit-packed codes), ``.scales``, ``.zeros`` (fp16) [``.g_idx``], plus every
  other parameter and persistent buffer at the model dtype (a tied head is
  stored once, with the embedding); checked by a SHA-256 in its metadata;
- ``quantization.json``: format, base model (source, fingerprint), quantizer
  spec, bits per layer, per-linear config, calibration and the size report;
- ``config.json`` (the model's own) and, when given, the tokenizer files.

:func:`load_quantized` rebuilds the architecture from ``config.json``, loads
the dense parts and writes ``dequantize(stored)`` into each linear, so the
reloaded model gives the same logits as the in-memory quantized copy.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from engine.core.architectures import architecture_of
from engine.core.paths import atomic_folder
from engine.quant.files import (
    read_checked,
    weight_config,
    weight_from_tensors,
    weight_to_tensors,
    write_checked,
)
from engine.quant.grid import QuantizationError, QuantizerSpec
from engine.quant.layer_bits import normalize_all
from engine.quant.quantize_model import QuantizedModel, QuantizeStats, apply_weights

SAVE_FORMAT = "layerlab-quantized-model"
SAVE_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "quantization.json"


def _linear_prefixes(qm: QuantizedModel) -> list[dict[str, str]]:
    arch = qm.architecture
    return [{name: f"{arch.layers}.{i}.{path}" for name, path in arch.linears.items()}
            for i in range(len(qm.bits))]


def save_quantized(qm: QuantizedModel, folder: str | Path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``qm`` to ``folder`` atomically (staged in a sibling temp folder, then renamed)."""
    folder = Path(folder)
    prefixes = _linear_prefixes(qm)
    quantized = {f"{p}.weight" for layer in prefixes for p in layer.values()}
    tensors, linears, seen = {}, {}, set()
    for name, tensor in qm.tensor_source().state_dict().items():  # quantized linears are skipped, not materialised
        if name in quantized or tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    for layer_prefixes, layer_weights in zip(prefixes, qm.weights):
        for short, prefix in layer_prefixes.items():
            tensors.update(weight_to_tensors(layer_weights[short], prefix))
            linears[prefix] = weight_config(layer_weights[short])
    dtype = next(qm.model.parameters()).dtype
    info = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "source": qm.source, "fingerprint": qm.fingerprint,
            "model_type": qm.architecture.model_type, "dtype": str(dtype).replace("torch.", ""),
            "attn_implementation": getattr(qm.model.config, "_attn_implementation", None),
            "quantizer": qm.spec.to_dict(), "bits": list(qm.bits), "linears": linears,
            "calibration": qm.calibration, "size": qm.size().to_dict()}
    with atomic_folder(folder, overwrite) as staging:
        write_checked(staging / WEIGHTS_FILE, tensors, {"linears": linears})
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2))
        qm.model.config.save_pretrained(staging)
        tokenizer = tokenizer if tokenizer is not None else qm.tokenizer
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return folder


def load_quantized(folder: str | Path, device: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild a model saved by :func:`save_quantized` (weights = dequantize(stored))."""
    folder = Path(folder)
    info_path = folder / INFO_FILE
    if not info_path.exists():
        raise QuantizationError(f"'{folder}' holds no {INFO_FILE}: it is not a saved LayerLab quantized model.")
    info = json.loads(info_path.read_text())
    if info.get("format") != SAVE_FORMAT or info.get("version") != SAVE_VERSION:
        raise QuantizationError(f"'{folder}' has an unknown format ({info.get('format')} v{info.get('version')}).")
    tensors, _ = read_checked(folder / WEIGHTS_FILE)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    dtype = getattr(torch, info["dtype"])
    kwargs = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    arch = architecture_of(model)
    bits = normalize_all(info["bits"], list(arch.linears))
    weights = []
    for i in range(len(bits)):
        layer = {}
        for short, path in arch.linears.items():
            prefix = f"{arch.layers}.{i}.{path}"
            layer[short] = weight_from_tensors(tensors, prefix, info["linears"][prefix])
            for suffix in (".qweight", ".scales", ".zeros", ".g_idx"):
                tensors.pop(prefix + suffix, None)
        weights.append(layer)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    quantized = {f"{path}.weight" for path in arch.linear_paths(len(bits))}
    tied = {f"{arch.head}.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - quantized - tied:
        raise QuantizationError(f"'{folder}' does not match its config: "
                                f"missing {sorted(set(missing) - quantized - tied)}"
                                f", unexpected {sorted(unexpected)}.")
    if tied:
        model.tie_weights()
    apply_weights(model, arch, weights)
    model.to(device).eval()
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return QuantizedModel(model=model, architecture=arch, spec=QuantizerSpec(**info["quantizer"]), bits=bits,
                          weights=weights, source=info.get("source", ""), fingerprint=info.get("fingerprint", ""),
                          calibration=info.get("calibration"), stats=QuantizeStats(), tokenizer=tokenizer)
