"""compressed-tensors folders: mixed-bit quantized models that vLLM serves on a GPU (and transformers loads, symmetric).

The format is compressed-tensors' ``pack-quantized`` (what llm-compressor
writes for GPTQ / RTN int weights).  Per quantized linear the safetensors
file holds

- ``weight_packed``: int32 ``[out, ceil(in * bits / 32)]``, the signed codes
  ``q = code - 2**(bits-1)`` packed by compressed-tensors' own packer;
- ``weight_scale``: fp16 ``[out, groups]`` (LayerLab's scales as they are);
- ``weight_shape``: int64 ``[2]``, the dense shape;
- ``weight_zero_point`` (integer grid only): int32 ``[ceil(out * bits / 32), groups]``, the signed zero
  points ``zero - 2**(bits-1)`` packed along the output dimension (compressed-tensors' and vLLM's layout);

and ``config.json``'s ``quantization_config`` has one config group per bit
level whose targets are that level's linears by name, so each layer keeps
its own width.  compressed-tensors dequantizes ``(q - zero_point) * scale``:
with ``symmetric: true`` (no zero point) that is exactly LayerLab's *symmetric*
grid, with ``symmetric: false`` exactly its *integer* zero-point grid (codes
and zeros both shifted by ``2**(bits-1)``); both export exactly, the float
zero point (an fp16 group minimum) does not.

Loading: vLLM runs the packed weights with its int kernels on a GPU (zero points at 4 bits only).
``AutoModelForCausalLM.from_pretrained(folder)`` with the ``compressed-tensors`` package installed
decompresses symmetric folders into the model's dtype on load (on CPU too); transformers 5.23 with
compressed-tensors 0.20 refuses folders with zero points (it makes the zero-point parameters unpacked,
``[out, groups]``, then meets the packed checkpoint tensors: "size mismatch"; llm-compressor #1618), so
:func:`load_ct_folder` reads those with compressed-tensors' own decompressor instead.  Loading in bf16 rounds
the fp16 scales to bf16; load in fp16 or fp32 to compute exactly what LayerLab measured.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from engine.core.models import LoadedModel
from engine.core.paths import atomic_folder
from engine.export.hf_folder import WEIGHTS_FILE, ExportError, folder_bytes, saved_tensors, tensors_to_save
from engine.export.vllm_rules import has_zero_points, vllm_problems, vllm_verdict
from engine.quant.grid import QuantizedWeight, QuantizerSpec, symmetric_zero
from engine.quant.quantize_model import QuantizedModel
from engine.quant.runtimes import Runtime

FORMAT = "pack-quantized"
CT_ZERO_POINTS = ("symmetric", "integer")
"""LayerLab's grids a compressed-tensors folder holds exactly (``symmetric: true`` / ``false``)."""


def ct_group_sizes(loaded: LoadedModel, candidates=(32, 64, 128, 256)) -> list[int]:
    """The group sizes of ``candidates`` that divide every decoder linear's row width (what compressed-tensors
    can hold for this model)."""
    arch = loaded.architecture
    widths = {int(linear.weight.shape[1]) for layer in arch.decoder_layers(loaded.model)
              for linear in arch.layer_linears(layer).values() if isinstance(linear, nn.Linear)}
    return [g for g in candidates if all(w % g == 0 for w in widths)]


def default_group_size(loaded: LoadedModel, runtime: Runtime, preferred: int = 128) -> int | None:
    """The group size a plan for ``runtime`` starts from on this model: ``preferred``, unless the runtime loads
    compressed-tensors folders and this model's row widths need another: then the largest size up to
    ``preferred`` that the runtime takes and the checkpoint holds (SmolLM2's 576: 64), else the smallest above
    it, else one scale per row (``None``) where the runtime takes that."""
    if runtime.export != "ct":
        return preferred
    fitting = [g for g in ct_group_sizes(loaded) if g in runtime.group_sizes]
    if not fitting:
        return None if None in runtime.group_sizes else preferred  # the run's refusal then names what fits
    return max([g for g in fitting if g <= preferred], default=min(fitting))


def ct_unsupported(loaded: LoadedModel, spec: QuantizerSpec) -> str | None:
    """Why a quantization with ``spec`` of the loaded model cannot be a compressed-tensors folder;
    ``None`` if it can."""
    if importlib.util.find_spec("compressed_tensors") is None:
        return "the compressed-tensors package is not installed here: `pip install compressed-tensors`."
    if spec.zero_point not in CT_ZERO_POINTS:
        return ("compressed-tensors holds LayerLab's symmetric and integer zero-point grids exactly, not the float "
                "zero point (an fp16 group minimum). Quantize with zero point 'integer' or 'symmetric' to export "
                "this way.")
    if spec.stores_group_index:
        return "act-order GPTQ with dynamic groups stores a group index; use static groups to export this way."
    arch = loaded.architecture
    linears = [linear for layer in arch.decoder_layers(loaded.model) for linear in arch.layer_linears(layer).values()]
    if not all(isinstance(linear, nn.Linear) for linear in linears):
        return "compressed-tensors covers torch Linear layers; this model's fused experts or Conv1D layers are not."
    widths = sorted({int(linear.weight.shape[1]) for linear in linears})
    if spec.group_size is not None and any(w % spec.group_size for w in widths):
        fitting = [g for g in (32, 64, 128, 256) if all(w % g == 0 for w in widths)]
        return (f"compressed-tensors needs every row width to be a multiple of the group size; this model's widths "
                f"are {', '.join(map(str, widths))} and the group size is {spec.group_size}. "
                + (f"Use group size {' or '.join(map(str, fitting))}." if fitting else
                   "No group size from 32 to 256 fits them: quantize with one scale per row."))
    return None


def _scheme(bits: int, spec: QuantizerSpec, targets: list[str]) -> dict:
    grouped = spec.group_size is not None
    return {"targets": targets, "format": FORMAT, "input_activations": None, "output_activations": None,
            "weights": {"num_bits": bits, "type": "int", "symmetric": spec.zero_point_at(bits) == "symmetric",
                        "dynamic": False,
                        "strategy": "group" if grouped else "channel",
                        "group_size": spec.group_size if grouped else None}}


def _packed(weight: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``weight_packed`` / ``weight_scale`` / ``weight_shape`` (+ ``weight_zero_point`` on the integer grid) of one
    linear: codes and zeros made signed (``- 2**(bits-1)``), then packed by compressed-tensors' own packer."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    half = symmetric_zero(weight.bits)
    signed = (weight.codes.to(torch.int16) - half).to(torch.int8)
    packed = {"weight_packed": pack_to_int32(signed.cpu(), weight.bits).contiguous(),
              "weight_scale": weight.scales.to(torch.float16).cpu().contiguous(),
              "weight_shape": torch.tensor(weight.shape, dtype=torch.int64)}
    if weight.zero_point == "integer":
        zeros = (weight.zeros.float().round().to(torch.int16) - half).to(torch.int8).cpu()
        packed["weight_zero_point"] = pack_to_int32(zeros, weight.bits, packed_dim=0).contiguous()
    return packed


def _zero_point_shape(out: int, groups: int, bits: int) -> list[int]:
    """Shape of a packed ``weight_zero_point``: ``groups`` columns of ``out`` zeros at ``bits`` bits, packed
    densely along the output dimension (compressed-tensors' ``pack_to_int32(..., packed_dim=0)``)."""
    return [math.ceil(out * bits / 32), groups]


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
                       torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def ct_weights_bytes(quantized: QuantizedModel, loaded: LoadedModel, dtype: torch.dtype | None = torch.float16) -> int:
    """Bytes of the ``model.safetensors`` :func:`write_ct_folder` writes, from shapes alone (nothing is packed):
    per linear ``ceil(in x bits / 32)`` int32 words per row, fp16 scales, packed zero points (integer grid) and
    an int64 shape; every other tensor in ``dtype`` (``None``: its own); the safetensors header.  What a run for a
    compressed-tensors runtime (vLLM, transformers; a quantization or a stack that drops whole layers) shows as
    its size."""
    names = loaded.architecture.linear_paths(len(quantized.bits))
    entries: dict[str, tuple[str, list[int]]] = {}
    for name, tensor in saved_tensors(quantized.tensor_source()).items():
        if name.removesuffix(".weight") not in names:
            kind = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
            entries[name] = (_SAFETENSORS_DTYPES[kind], list(tensor.shape))
    for module, (layer, short) in names.items():
        weight = quantized.weights[layer][short]
        out, inp = weight.shape
        entries[f"{module}.weight_packed"] = ("I32", [out, math.ceil(inp * weight.bits / 32)])
        entries[f"{module}.weight_scale"] = ("F16", list(weight.scales.shape))
        entries[f"{module}.weight_shape"] = ("I64", [2])
        if weight.zero_point == "integer":
            entries[f"{module}.weight_zero_point"] = ("I32", _zero_point_shape(out, weight.scales.shape[1],
                                                                               weight.bits))
    size = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
    rank = ["BOOL", "U8", "I8", "F16", "BF16", "I32", "F32", "I64"]  # safetensors: dtype descending, then name
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (kind, shape) in sorted(entries.items(), key=lambda item: (-rank.index(item[1][0]), item[0])):
        end = offset + size[kind] * math.prod(shape)
        header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    text = len(json.dumps(header, separators=(",", ":")))
    return 8 + text + (-text) % 8 + offset


def write_ct_folder(quantized: QuantizedModel, loaded: LoadedModel, folder: str | Path, *, overwrite: bool = False,
                    notes: dict | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write ``quantized`` as a compressed-tensors folder (staged, renamed at the end); returns what was written.

    ``dtype``: the unquantized tensors (embedding, head, norms) in this dtype instead of the model's own
    (16 bits halve the embedding; the codes and fp16 scales are written as they are either way).

    Returns ``{"folder", "files", "bytes", "weights_bytes" (its safetensors), "remote_code": False,
    "exact_fraction": 1.0, "notes": [str],
    "reader"`` (what reads it back: transformers, or compressed-tensors' decompressor for zero points)``,
    "vllm_problems": [str]}``.
    Raises :class:`ExportError` (nothing written) when :func:`ct_unsupported` names a reason.
    """
    reason = ct_unsupported(loaded, quantized.spec)
    if reason:
        raise ExportError(reason)
    import compressed_tensors

    source = quantized.tensor_source()
    names = loaded.architecture.linear_paths(len(quantized.bits))
    state = {name: tensor for name, tensor in tensors_to_save(source, dtype).items()
             if name.removesuffix(".weight") not in names}  # the base's dense linears are replaced below
    by_bits: dict[int, list[str]] = {}
    for module, (layer, short) in names.items():
        weight = quantized.weights[layer][short]
        state.update({f"{module}.{key}": value for key, value in _packed(weight).items()})
        by_bits.setdefault(weight.bits, []).append(module)
    config = copy.deepcopy(source.config)
    if dtype is not None:
        config.dtype = dtype
    config.quantization_config = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {f"group_{bits}bit": _scheme(bits, quantized.spec, modules)
                          for bits, modules in sorted(by_bits.items())},
        "ignore": [loaded.architecture.head], "kv_cache_scheme": None, "sparsity_config": {},
        "transform_config": {}, "global_compression_ratio": None, "version": compressed_tensors.__version__}
    spec = quantized.spec
    lines = [f"{len(modules)} linears at {bits} bits (pack-quantized int{bits}, "
             f"{'symmetric' if spec.zero_point_at(bits) == 'symmetric' else 'a zero point per group'}, "
             f"{'group ' + str(spec.group_size) if spec.group_size else 'per row'})"
             for bits, modules in sorted(by_bits.items())]
    lines.append(vllm_verdict(config.quantization_config))
    zero_points = has_zero_points(config.quantization_config)
    copied = "codes, fp16 scales and zero points" if zero_points else "codes and fp16 scales"
    lines.append(f"{copied} copied as they are" + (
        f"; the unquantized tensors rounded to {str(dtype).removeprefix('torch.')}" if dtype is not None else
        ": the folder computes what the app measured"))
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as staging:
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        config.save_pretrained(staging)
        if getattr(source, "generation_config", None) is not None:
            source.generation_config.save_pretrained(staging)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(staging)
        (staging / "layerlab_export.json").write_text(json.dumps({**(notes or {}), "types": lines}, indent=2,
                                                                 default=str))
    return {"folder": str(folder), "files": sorted(p.name for p in folder.iterdir()), "bytes": folder_bytes(folder),
            "weights_bytes": folder_bytes(folder, "*.safetensors"), "remote_code": False, "exact_fraction": 1.0,
            "notes": lines,
            "reader": "compressed-tensors" if zero_points else "transformers",  # what load_ct_folder reads it with
            "vllm_problems": vllm_problems(config.quantization_config)}


def load_ct_folder(folder: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The folder read back the way a user would, weights decompressed: transformers with compressed-tensors;
    for folders with zero points (which transformers 5.23 refuses, see the module docstring) the model built from
    its config with every quantized linear decompressed by compressed-tensors' own ``PackedQuantizationCompressor``
    (not LayerLab's code)."""
    from transformers import AutoModelForCausalLM

    quantization_config = json.loads((Path(folder) / "config.json").read_text()).get("quantization_config", {})
    if not has_zero_points(quantization_config):
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    return _decompressed_by_compressed_tensors(Path(folder), quantization_config.get("config_groups", {}), dtype)


def _decompressed_by_compressed_tensors(folder: Path, groups: dict, dtype: torch.dtype) -> nn.Module:
    """The model of ``config.json`` with ``model.safetensors`` loaded into it, each quantized linear (the targets of
    ``groups``, the config's ``config_groups``) decompressed by compressed-tensors into ``weight`` (``dtype``)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    schemes = {target: QuantizationScheme(targets=group["targets"], weights=group["weights"])
               for group in groups.values() for target in group["targets"]}
    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state: dict[str, torch.Tensor] = {}
    tensors = load_file(folder / WEIGHTS_FILE)
    packed_keys = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
    for name, tensor in tensors.items():
        module, _, key = name.rpartition(".")
        if module not in schemes or key not in packed_keys:  # unquantized tensors, biases of quantized linears
            state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        elif key == "weight_packed":  # scales in the load dtype, as transformers decompresses (fp32: exact)
            parts = {k: tensors[f"{module}.{k}"] for k in packed_keys if f"{module}.{k}" in tensors}
            parts["weight_scale"] = parts["weight_scale"].to(dtype)
            state[f"{module}.weight"] = PackedQuantizationCompressor.decompress(parts, schemes[module])["weight"].to(
                dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {}) | (
        {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) else set())
    untied = [m for m in missing if m not in tied]
    if untied or unexpected:
        raise ExportError(f"The folder does not match its config: missing {untied[:3]}, unexpected {unexpected[:3]}.")
    model.tie_weights()
    return model.eval()
