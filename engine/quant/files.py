"""Storage of quantized weights: bit-packing and checked, atomic safetensors files (no pickle).

Codes are bit-packed at every width 2-8 (:func:`pack_codes`, little-endian
bit stream over the row-major ``[out, in]`` codes, so 3 bits really take 3
bits); scales and zeros stay fp16 (the symmetric grid stores no zeros); act-order GPTQ adds an int32
``g_idx``.

Every file carries, in its safetensors metadata, a SHA-256 over its tensor
names and bytes; :func:`read_checked` recomputes it and raises
:class:`CorruptFileError` on any mismatch or unreadable file, so callers can
treat a damaged cache entry as a miss.  Writes go to a temporary file in the
same folder, then ``os.replace``: a crash leaves the old file or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.core.paths import atomic_file
from engine.quant.ggml_types import tensor_bytes
from engine.quant.ggml_weight import GgmlWeight
from engine.quant.grid import ZERO_POINTS, QuantizationError, QuantizedWeight, symmetric_zero

FORMAT = "layerlab-quant"
FORMAT_VERSION = "1"


class CorruptFileError(QuantizationError):
    """A quantized-weights file is unreadable or fails its checksum."""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over sorted names, dtypes, shapes and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_checked(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    """Write ``tensors`` (CPU, contiguous) with ``info`` (JSON) and a checksum, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "info": json.dumps(info, sort_keys=True),
                "sha256": tensors_checksum(tensors)}
    with atomic_file(path) as temp:
        save_file(tensors, str(temp), metadata=metadata)


def read_checked(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and ``info`` of a file written by :func:`write_checked`, verified."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        if metadata.get("format") != FORMAT:
            raise CorruptFileError(f"{path} is not a LayerLab quantized-weights file.")
        if metadata.get("version") != FORMAT_VERSION:
            raise CorruptFileError(f"{path} has format version {metadata.get('version')}; "
                                   f"this LayerLab reads version {FORMAT_VERSION}. Quantize again.")
        if tensors_checksum(tensors) != metadata.get("sha256"):
            raise CorruptFileError(f"{path} fails its checksum: the file is damaged. Quantize again.")
        return tensors, json.loads(metadata["info"])
    except CorruptFileError:
        raise
    except Exception as err:  # safetensors raises several types on damaged headers
        raise CorruptFileError(f"{path} cannot be read ({err}). Quantize again.") from err


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-pack integer codes (any shape, row-major) into uint8 ``[ceil(n·bits/8)]``.

    Little-endian bit stream: code ``j`` occupies bits ``j·bits .. (j+1)·bits - 1``.
    Eight codes fill exactly ``bits`` bytes, so they go through one int64 word.
    """
    flat = codes.reshape(-1).to(torch.int64)
    count = flat.numel()
    flat = torch.nn.functional.pad(flat, (0, (-count) % 8)).view(-1, 8)
    shifts = torch.arange(8, device=flat.device, dtype=torch.int64)
    word = (flat << (shifts * bits)).sum(dim=1, keepdim=True)  # disjoint bits: sum == or
    packed = ((word >> (shifts[:bits] * 8)) & 0xFF).to(torch.uint8)
    return packed.reshape(-1)[: (count * bits + 7) // 8].clone()


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[count]`` codes."""
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (count * bits + 7) // 8:
        raise CorruptFileError("Packed weights do not match their recorded shape and bits: the data is damaged.")
    words = -(-count // 8)
    padded = torch.nn.functional.pad(packed, (0, words * bits - packed.numel())).view(words, bits)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64)
    word = (padded.to(torch.int64) << (shifts[:bits] * 8)).sum(dim=1, keepdim=True)
    codes = ((word >> (shifts * bits)) & (2**bits - 1)).to(torch.uint8)
    return codes.reshape(-1)[:count].clone()


def weight_config(weight: QuantizedWeight) -> dict:
    """JSON description needed to read :func:`weight_to_tensors` back."""
    return {"shape": list(weight.shape), "bits": weight.bits, "group_size": weight.group_size,
            "method": weight.method, "act_order": weight.g_idx is not None, "zero_point": weight.zero_point}


def weight_to_tensors(weight: QuantizedWeight, prefix: str) -> dict[str, torch.Tensor]:
    """Storage form: ``prefix.qweight`` (packed uint8), ``.scales``, ``.zeros`` (fp16; not for the symmetric
    grid, whose zero is ``2**(bits-1)``) [+ ``.g_idx``]."""
    tensors = {
        f"{prefix}.qweight": pack_codes(weight.codes.cpu(), weight.bits),
        f"{prefix}.scales": weight.scales.cpu().contiguous(),
    }
    if weight.zero_point != "symmetric":
        tensors[f"{prefix}.zeros"] = weight.zeros.cpu().contiguous()
    if weight.g_idx is not None:
        tensors[f"{prefix}.g_idx"] = weight.g_idx.cpu().contiguous()
    return tensors


def weight_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, config: dict) -> QuantizedWeight:
    """Inverse of :func:`weight_to_tensors`."""
    zero_point = str(config.get("zero_point", "integer"))
    if zero_point not in ZERO_POINTS:
        raise CorruptFileError(f"Quantized weight '{prefix}' has an unknown zero point '{zero_point}'.")
    try:
        out, inp = (int(v) for v in config["shape"])
        bits, group_size = int(config["bits"]), int(config["group_size"])
        codes = unpack_codes(tensors[f"{prefix}.qweight"], bits, out * inp).reshape(out, inp)
        scales = tensors[f"{prefix}.scales"]
        zeros = (torch.full_like(scales, symmetric_zero(bits)) if zero_point == "symmetric"
                 else tensors[f"{prefix}.zeros"])
        g_idx = tensors.get(f"{prefix}.g_idx")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"Quantized weight '{prefix}' is missing data ({err}).") from err
    groups = -(-inp // group_size)
    if scales.shape != (out, groups) or zeros.shape != (out, groups) or (g_idx is not None and g_idx.shape != (inp,)):
        raise CorruptFileError(f"Quantized weight '{prefix}' has scales/zeros of the wrong shape.")
    if g_idx is None and groups > 1 and group_size * (groups - 1) >= inp:
        raise CorruptFileError(f"Quantized weight '{prefix}' has an impossible group size.")
    return QuantizedWeight(codes=codes, scales=scales, zeros=zeros, bits=bits, group_size=group_size,
                           method=str(config.get("method", "rtn")), g_idx=g_idx, zero_point=zero_point)


def _ggml_from_tensors(tensors: dict[str, torch.Tensor], prefix: str, config: dict) -> GgmlWeight:
    try:
        out, inp = (int(v) for v in config["shape"])
        blocks, qtype = tensors[f"{prefix}.blocks"], str(config["qtype"])
        expected = out * (2 * inp if qtype == "F16" else 4 * inp if qtype == "F32" else tensor_bytes(qtype, 1, inp))
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptFileError(f"llama.cpp weight '{prefix}' is missing data ({err}).") from err
    if blocks.dtype != torch.uint8 or blocks.numel() != expected:
        raise CorruptFileError(f"llama.cpp weight '{prefix}' does not hold {out}x{inp} {qtype} weights.")
    return GgmlWeight(blocks.reshape(out, -1), qtype, inp, int(config["bits"]), str(config.get("wanted", qtype)),
                      bool(config.get("imatrix", False)))


def layer_to_tensors(weights: dict[str, QuantizedWeight | GgmlWeight]) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer's quantized linears -> (tensors, JSON config per linear)."""
    tensors: dict[str, torch.Tensor] = {}
    config = {}
    for name, weight in weights.items():
        if isinstance(weight, GgmlWeight):
            tensors[f"{name}.blocks"] = weight.blocks.contiguous()
            config[name] = weight.config()
            continue
        tensors.update(weight_to_tensors(weight, name))
        config[name] = weight_config(weight)
    return tensors, config


def layer_from_tensors(tensors: dict[str, torch.Tensor], config: dict) -> dict[str, QuantizedWeight | GgmlWeight]:
    """Inverse of :func:`layer_to_tensors`."""
    return {name: _ggml_from_tensors(tensors, name, cfg) if cfg.get("format") == "ggml"
            else weight_from_tensors(tensors, name, cfg) for name, cfg in config.items()}
