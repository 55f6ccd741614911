"""GGUF files of runs quantized in llama.cpp's own types: the bytes the app measured, nothing re-rounded.

A run made with the ``llama.cpp`` quantizer (:mod:`engine.quant.ggml_weight`)
holds every decoder linear as llama.cpp blocks; this writer puts those very
blocks into the file (q/k rows reordered as llama.cpp's converter orders them
for Llama-family models: blocks never cross rows, so reordering rows of
blocks equals quantizing reordered rows).  The embedding and the output
matrix get the run's output type (:func:`engine.quant.ggml_weight.output_weight`,
the same bytes the in-app variant was evaluated with).

Metadata: when the model came from a GGUF file (the built-in models), that
file is the template: its key/values (architecture, tokenizer, chat
template) and tensor list are kept, its other tensors (norms) copied as they
are, and only ``general.file_type`` dropped (the mix is no preset).  Other
models: Llama/Mistral/Qwen2 hyper-parameters and byte-level BPE tokenizers,
as :mod:`engine.export.gguf_file` writes them.

:func:`gguf_file_bytes` is the exact size of the file :func:`write_llamacpp_gguf`
writes (header with key/values and tensor infos, each tensor padded to the
32-byte alignment), computed from shapes and types without quantizing.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import gguf
import numpy as np

from engine.core.architectures import get_submodule
from engine.core.builtins import BUILTINS, builtin_gguf_path
from engine.core.models import LoadedModel
from engine.core.paths import atomic_folder
from engine.export.gguf_file import (
    GGUF_FAMILIES,
    GGUF_NAME,
    _hyperparameters,
    _permute_rows,
    _tokenizer_metadata,
    check_gguf_family,
)
from engine.export.hf_folder import ExportError
from engine.quant.ggml_types import output_type, tensor_bytes, type_for_level
from engine.quant.ggml_weight import GgmlWeight, output_weight
from engine.quant.grid import LLAMACPP, QuantizerSpec
from engine.quant.layer_bits import LayerBits, linear_bits
from engine.quant.quantize_model import QuantizedModel

T = gguf.GGMLQuantizationType
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
_DROPPED_KEYS = ("general.file_type",)


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: GGUF ``name``, ``rows x cols`` (cols = weights per row), ``qtype``, and what it is:
    ``linear`` (``layer``, short ``linear`` name), ``output`` (embedding / head: HF ``path``), or ``copy``
    (taken from the template) / ``plain`` (the model's tensor at ``path``, F32 for vectors, F16 otherwise)."""

    name: str
    rows: int
    cols: int
    qtype: str
    role: str
    layer: int = -1
    linear: str = ""
    path: str = ""

    @property
    def nbytes(self) -> int:
        if self.qtype in ("F32", "F16"):
            return self.rows * self.cols * (4 if self.qtype == "F32" else 2)
        return tensor_bytes(self.qtype, self.rows, self.cols)


@lru_cache(maxsize=4)
def read_template(path: Path) -> gguf.GGUFReader:
    """The template file, read once (its key/values hold a whole vocabulary: seconds to parse for Gemma-3)."""
    return gguf.GGUFReader(str(path))


def source_gguf(loaded: LoadedModel) -> Path | None:
    """The GGUF file the model was converted from (the built-in models), else ``None``."""
    return builtin_gguf_path(loaded.source) if loaded.source in BUILTINS else None


def gguf_arch_of(loaded: LoadedModel, template: gguf.GGUFReader | None) -> tuple[str, bool]:
    """(GGUF architecture name, q/k rows permuted) for the model."""
    model_type = loaded.model.config.model_type
    if template is not None:
        arch = template.fields["general.architecture"].contents()
        return arch, GGUF_FAMILIES.get(model_type, (arch, False))[1]
    return check_gguf_family(loaded.model)


def linear_tensor_names(loaded: LoadedModel, gguf_arch: str) -> dict[str, tuple[int, str]]:
    """GGUF weight name -> (layer, short linear name) for every decoder linear."""
    arch = loaded.architecture
    n_layers = loaded.num_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], n_layers)
    found = {}
    for path, where in arch.linear_paths(n_layers).items():
        name = name_map.get_name(f"{path}.weight", try_suffixes=(".weight",))
        if name is None:
            raise ExportError(f"No GGUF name for '{path}' of {loaded.model.config.model_type}.")
        found[name] = where
    return found


def layout(loaded: LoadedModel, spec: QuantizerSpec, bits: tuple[LayerBits, ...]) -> tuple[list[Entry], Path | None]:
    """Every tensor of the file for ``bits`` per layer, in file order, and the template file (or ``None``)."""
    if spec.method != LLAMACPP:
        raise ExportError(f"This run was quantized with {spec.label()}, LayerLab's research grid: no llama.cpp "
                          "type holds its weights exactly. Re-run it with the llama.cpp quantizer to export an "
                          "exact GGUF, or use the GGUF export's 'compact' choice (re-rounded).")
    template_path = source_gguf(loaded)
    template = read_template(template_path) if template_path else None
    gguf_arch, _ = gguf_arch_of(loaded, template)
    linears = linear_tensor_names(loaded, gguf_arch)
    arch = loaded.architecture
    embedding = get_submodule(loaded.model, arch.embedding).weight
    out_choice = output_type(int(embedding.shape[1]), spec.output_type).qtype
    entries = []

    def linear_entry(name: str) -> Entry:
        layer, short = linears[name]
        weight = arch.layer_linears(arch.decoder_layers(loaded.model)[layer])[short].weight
        rows, cols = (int(v) for v in weight.shape)
        qtype = type_for_level(linear_bits(bits[layer], short), cols, spec.ggml_types).qtype
        return Entry(name, rows, cols, qtype, "linear", layer, short)

    if template is not None:
        for tensor in template.tensors:
            cols = int(tensor.shape[0])
            rows = int(np.prod(tensor.shape[1:])) if len(tensor.shape) > 1 else 1
            if tensor.name in linears:
                entries.append(linear_entry(tensor.name))
            elif tensor.name in ("token_embd.weight", "output.weight"):
                path = arch.embedding if tensor.name == "token_embd.weight" else arch.head
                entries.append(Entry(tensor.name, rows, cols, out_choice, "output", path=path))
            else:
                entries.append(Entry(tensor.name, rows, cols, tensor.tensor_type.name, "copy"))
        return entries, template_path
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[gguf_arch.upper()], loaded.num_layers)
    seen: set[int] = set()
    for path, tensor in loaded.model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue  # a tied head is the embedding
        seen.add(tensor.data_ptr())
        name = name_map.get_name(path, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"No GGUF name for tensor '{path}' of {loaded.model.config.model_type}.")
        if name in linears:
            entries.append(linear_entry(name))
        elif path.startswith((arch.embedding + ".weight", arch.head + ".weight")):
            entries.append(Entry(name, int(tensor.shape[0]), int(tensor.shape[1]), out_choice, "output",
                                 path=path.rsplit(".", 1)[0]))
        else:
            cols = int(tensor.shape[-1])
            entries.append(Entry(name, int(tensor.numel() // cols), cols, "F32" if tensor.dim() == 1 else "F16",
                                 "plain", path=path))
    return entries, None


def _writer(path: Path, loaded: LoadedModel, template_path: Path | None) -> tuple[gguf.GGUFWriter, list[str]]:
    """A writer holding the file's key/values; returns it and notes on what the file lacks."""
    notes: list[str] = []
    if template_path is not None:
        template = read_template(template_path)
        writer = gguf.GGUFWriter(str(path), template.fields["general.architecture"].contents())
        for key, field in template.fields.items():
            if key.startswith("GGUF.") or key in ("general.architecture", *_DROPPED_KEYS):
                continue
            value = field.contents()
            if key == "general.name":
                value = f"{value} (LayerLab llama.cpp-type mix)"
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, value, field.types[0], sub_type=sub)
        return writer, notes
    gguf_arch, _ = check_gguf_family(loaded.model)
    writer = gguf.GGUFWriter(str(path), gguf_arch)
    writer.add_name(f"{loaded.source} (LayerLab llama.cpp-type mix)")
    _hyperparameters(writer, loaded.model.config, loaded.num_layers)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    missing = _tokenizer_metadata(writer, loaded.tokenizer, int(loaded.model.config.vocab_size)) \
        if loaded.tokenizer else "no tokenizer was loaded: the file has none"
    if missing:
        notes.append(missing)
    return writer, notes


def _pad(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


_HEADERS: dict[tuple, int] = {}


def _header_bytes(loaded: LoadedModel, names: tuple[tuple[str, int, int], ...], template: Path | None) -> int:
    """Bytes before the tensor data (padded), remembered per model: key/values and tensor infos do not depend
    on the types."""
    key = (loaded.fingerprint, loaded.source, names, str(template))
    if key not in _HEADERS:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "header.gguf"
            writer, _ = _writer(path, loaded, template)
            for name, rows, cols in names:
                writer.add_tensor_info(name, [rows, cols] if rows > 1 else [cols], np.dtype(np.float32),
                                       rows * cols * 4)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            writer.close()
            _HEADERS[key] = _pad(path.stat().st_size)
    return _HEADERS[key]


def gguf_file_bytes(loaded: LoadedModel, spec: QuantizerSpec, bits: tuple[LayerBits, ...]) -> int:
    """Exact size in bytes of the GGUF file :func:`write_llamacpp_gguf` writes for this allocation."""
    return _file_bytes(loaded, *layout(loaded, spec, bits))


def _file_bytes(loaded: LoadedModel, entries: list[Entry], template: Path | None) -> int:
    names = tuple((e.name, e.rows, e.cols) for e in entries)
    header = _header_bytes(loaded, names, template)
    return header + sum(_pad(e.nbytes) for e in entries)


def _rows_order(entry: Entry, loaded: LoadedModel, permute: bool) -> int | None:
    """Heads to interleave q/k rows by (Llama-family GGUF order), else ``None``."""
    if not permute or entry.linear not in ("q", "k"):
        return None
    config = loaded.model.config
    return config.num_attention_heads if entry.linear == "q" else (
        getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def _write_file(loaded: LoadedModel, entries: list[Entry], template_path: Path | None, folder: str | Path,
                overwrite: bool, tensor_data: Callable[[Entry], np.ndarray], notes: dict) -> tuple[Path, Counter, list]:
    """Write ``entries`` (data from ``tensor_data``; template tensors copied) into ``folder/model.gguf``."""
    template = read_template(template_path) if template_path else None
    template_data = {t.name: t for t in template.tensors} if template else {}
    types: Counter = Counter()
    folder = Path(folder)
    with atomic_folder(folder, overwrite) as staging:
        writer, lines = _writer(staging / GGUF_NAME, loaded, template_path)
        for entry in entries:
            data = np.asarray(template_data[entry.name].data) if entry.role == "copy" else tensor_data(entry)
            writer.add_tensor(entry.name, data, raw_dtype=None if entry.qtype in ("F32", "F16") else T[entry.qtype])
            types[entry.qtype] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        (staging / "layerlab_export.json").write_text(json.dumps(
            {**notes, "types": [{"name": e.name, "type": e.qtype, "role": e.role} for e in entries]}, indent=2,
            default=str))
    return folder / GGUF_NAME, types, lines


def write_llamacpp_gguf(quantized: QuantizedModel, loaded: LoadedModel, folder: str | Path, *,
                        overwrite: bool = False, notes: dict | None = None) -> dict:
    """Write ``folder/model.gguf`` holding the run's llama.cpp blocks as they are; returns what was written.

    Returns ``{"folder", "file", "files", "bytes", "types": {type: count}, "exact_fraction": 1.0, "notes"}``.
    """
    entries, template_path = layout(loaded, quantized.spec, quantized.bits)
    template = read_template(template_path) if template_path else None
    _, permute = gguf_arch_of(loaded, template)

    def tensor_data(entry: Entry) -> np.ndarray:
        if entry.role == "linear":
            stored = quantized.weights[entry.layer][entry.linear]
            if not isinstance(stored, GgmlWeight) or stored.qtype != entry.qtype:
                raise ExportError(f"Layer {entry.layer} {entry.linear} is not held as {entry.qtype}: the run "
                                  "does not match its allocation; re-run it.")
            heads = _rows_order(entry, loaded, permute)
            data = stored.blocks.numpy()
            return data if heads is None else np.ascontiguousarray(_permute_rows(data, heads))
        if entry.role == "output":
            return output_weight(get_submodule(loaded.model, entry.path).weight,
                                 quantized.spec.output_type).blocks.numpy()
        values = loaded.model.state_dict()[entry.path].detach().float().cpu().numpy()
        return values.astype(np.float32 if entry.qtype == "F32" else np.float16)

    path, types, lines = _write_file(loaded, entries, template_path, folder, overwrite, tensor_data,
                                     {**(notes or {}), "quantizer": quantized.spec.to_dict()})
    fallbacks = sum(1 for e in entries if e.role == "linear" and
                    type_for_level(linear_bits(quantized.bits[e.layer], e.linear), e.cols,
                                   quantized.spec.ggml_types).fell_back)
    lines.insert(0, f"Every tensor written as the run holds it (llama.cpp's own quantizer and types); {fallbacks} "
                    "linears use llama.cpp's fallback type for rows that are not a multiple of 256.")
    return {"folder": str(folder), "file": str(path), "files": sorted(p.name for p in Path(folder).iterdir()),
            "bytes": path.stat().st_size, "remote_code": False, "types": dict(types), "exact_fraction": 1.0,
            "type_choice": "llama.cpp", "notes": lines}


def write_float_gguf(loaded: LoadedModel, folder: str | Path, qtype: str = "F32", *, overwrite: bool = False) -> Path:
    """The loaded model as an unquantized GGUF (every matrix in ``qtype``: F32 or F16, vectors F32): the input
    ``llama-quantize`` and ``llama-imatrix`` start from, with the same metadata as LayerLab's own files."""
    if qtype not in ("F32", "F16"):
        raise ExportError(f"An unquantized GGUF holds F32 or F16 tensors, not {qtype}.")
    n = loaded.num_layers
    entries, template_path = layout(loaded, QuantizerSpec(method=LLAMACPP, bits=8), tuple([8] * n))
    entries = [replace(e, qtype=qtype) if e.role in ("linear", "output") else e for e in entries]
    template = read_template(template_path) if template_path else None
    _, permute = gguf_arch_of(loaded, template)
    arch = loaded.architecture

    def tensor_data(entry: Entry) -> np.ndarray:
        if entry.role == "linear":
            weight = arch.layer_linears(arch.decoder_layers(loaded.model)[entry.layer])[entry.linear].weight
        elif entry.role == "output":
            weight = get_submodule(loaded.model, entry.path).weight
        else:
            weight = loaded.model.state_dict()[entry.path]
        values = weight.detach().float().cpu().numpy()
        heads = _rows_order(entry, loaded, permute)
        values = values if heads is None else _permute_rows(values, heads)
        return np.ascontiguousarray(values.astype(np.float32 if entry.qtype == "F32" or values.ndim == 1
                                                  else np.float16))

    path, _, _ = _write_file(loaded, entries, template_path, folder, overwrite, tensor_data,
                             {"model": loaded.source, "unquantized": qtype})
    return path


def llamacpp_details(loaded: LoadedModel, spec: QuantizerSpec, bits: tuple[LayerBits, ...]) -> dict:
    """What a run in llama.cpp's types records: its runtime, type set, imatrix, the type of every tensor
    (counted, fallbacks named) and the exact GGUF file size (``file_bytes``; ``None`` with ``file_note`` when
    this model's family cannot be written as GGUF)."""
    details = {"runtime": "llama.cpp (GGUF)", "ggml_types": spec.ggml_types, "imatrix": spec.imatrix,
               "file_bytes": None}
    try:
        entries, template = layout(loaded, spec, bits)
        details["file_bytes"] = _file_bytes(loaded, entries, template)
    except ExportError as err:
        details["file_note"] = str(err)
        return details
    counts: Counter = Counter()
    for e in entries:
        if e.role == "linear":
            choice = type_for_level(linear_bits(bits[e.layer], e.linear), e.cols, spec.ggml_types)
            counts[choice.label()] += 1
        elif e.role == "output":
            counts[f"{e.qtype} (embedding/output)"] += 1
    details["tensor_types"] = dict(counts)
    details["output_type"] = next((e.qtype for e in entries if e.role == "output"), None)
    details["gguf_template"] = None if template is None else template.name
    return details
