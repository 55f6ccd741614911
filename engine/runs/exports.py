"""Export a stored run's model in a format that runs outside LayerLab, verify it, and store the result with the run.

Pages and the CLI call :func:`export_run`.  The model is the one the run
evaluated: passed in when the page still holds it, else rebuilt from the
run's record (dropping: the stored layers; slicing: the stored dims and
calibration windows; quantization: the stored bits and quantizer, from the
per-layer cache).  After writing, the export is reloaded through its target
loader (transformers; transformers' GGUF loader for GGUF; transformers with
compressed-tensors for compressed-tensors folders) and its perplexity
compared with the in-app model's on a few evaluation windows of the run; the
outcome is appended to the run's ``config["exports"]``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import torch

from engine.core.data import DataSpec, token_windows
from engine.core.models import LoadedModel
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.paths import FolderExistsError, cache_root
from engine.core.progress import StageProgress, stage_callback
from engine.export.gguf_llamacpp import llamacpp_details, write_llamacpp_gguf
from engine.export.hf_folder import ExportError, load_hf_folder, write_hf_folder
from engine.export.verify import round_trip
from engine.llamacpp.agreement import comparison_seconds_per_position
from engine.llamacpp.runtime import LlamaCppUnavailable
from engine.methods import method_named
from engine.methods.base import FORMATS
from engine.quant.ggml_weight import extra_model_forward_seconds
from engine.quant.grid import LLAMACPP, QuantizerSpec
from engine.quant.layer_bits import all_levels
from engine.quant.quantize_model import QuantizedModel
from engine.runs.record import RunRecord
from engine.runs.store import ResultsStore

# promised |perplexity change| of the round trip (GGUF: exact types; compressed-tensors: always exact)
TOLERANCE = {"hf": 0.005, "gguf": 0.02, "ct": 0.005}
VERIFY_WINDOWS = 4


def export_formats(record: RunRecord, loaded: LoadedModel | None = None) -> dict[str, str | None]:
    """Format -> ``None`` if ``record``'s model can be exported that way, else why not (compressed-tensors also
    depends on the quantizer and the model's widths: checked when ``loaded`` is given).  The run's method says."""
    method = method_named(record.method)
    if method is None:
        return dict.fromkeys(FORMATS, f"{record.method} runs have nothing to export beyond the base model.")
    return method.export_formats(record, loaded)


def default_export_folder(record: RunRecord, fmt: str) -> Path:
    """``cache/exports/run-<id>-<format>``."""
    return cache_root() / "exports" / f"run-{record.id}-{fmt}"


HF_DTYPES = ("float16", "bfloat16", "float32")


def check_export(loaded: LoadedModel, record: RunRecord, fmt: str, out: str | Path, overwrite: bool,
                 dtype: str | None = None) -> None:
    """Refuse before any work: wrong model loaded, format not available for the run, a non-empty folder."""
    if dtype is not None and (fmt == "gguf" or dtype not in HF_DTYPES):
        raise ExportError(f"Weights dtype '{dtype}' applies to Hugging Face and compressed-tensors folders only "
                          f"and must be one of {', '.join(HF_DTYPES)} (GGUF files choose a type per tensor).")
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format '{fmt}'. Choose one of: {', '.join(FORMATS)}.")
    if record.model_fingerprint != loaded.fingerprint:
        raise ExportError(f"Run {record.id} was made from '{record.model}', not from the loaded model "
                          f"'{loaded.source}': load that model first, then export.")
    reason = export_formats(record, loaded).get(fmt)
    if reason:
        raise ExportError(f"Run {record.id} cannot be exported as {fmt}: {reason}")
    out = Path(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise FolderExistsError(f"'{out}' already exists and is not empty: choose another folder, or tick "
                                "'overwrite' to replace it.")


def quantized_as(record: RunRecord) -> tuple[QuantizerSpec, tuple] | None:
    """The quantizer and per-layer bits of ``record``'s model (``None``: its weights are not quantized)."""
    method = method_named(record.method)
    return None if method is None else method.quantized_as(record)


def in_llamacpp_types(record: RunRecord) -> bool:
    """Whether ``record``'s model holds llama.cpp's own types (its GGUF file is run by llama.cpp itself)."""
    quantized = quantized_as(record)
    return quantized is not None and quantized[0].method == LLAMACPP


def gguf_type_lines(loaded: LoadedModel, record: RunRecord, mode: str = "exact") -> list[str]:
    """What the GGUF file of a quantized run will hold: one line per (bits, type), with the reason."""
    from engine.export.gguf_file import describe_choices, plan_gguf_types, size_against_run

    spec, bits = quantized_as(record)
    if spec.method == LLAMACPP:
        details = llamacpp_details(method_named(record.method).written_from(loaded, record), spec, bits)
        if details["file_bytes"] is None:
            return [details.get("file_note", "")]
        return [f"{count} tensors in {qtype}" for qtype, count in details["tensor_types"].items()] + [
            "exactly as the run measured them (llama.cpp's own quantizer); "
            f"file {details['file_bytes'] / 2**20:.1f} MiB"]
    choices = plan_gguf_types(loaded, list(bits), spec, mode)
    larger = size_against_run(loaded, list(bits), spec, choices)
    return describe_choices(choices) + ([larger] if larger else [])


def export_archive(result: dict) -> tuple[bytes, str, str]:
    """(bytes, file name, MIME type) to download an export: the GGUF file itself, or the folder as a zip."""
    import io
    import zipfile

    folder = Path(result["folder"])
    if result["format"] == "gguf":
        return Path(result["file"]).read_bytes(), f"{folder.name}.gguf", "application/octet-stream"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, Path(folder.name) / path.relative_to(folder))
    return buffer.getvalue(), f"{folder.name}.zip", "application/zip"


def rebuild_model(loaded: LoadedModel, record: RunRecord,
                  progress: StageProgress | None = None) -> torch.nn.Module | QuantizedModel:
    """The model ``record`` evaluated, rebuilt from its config by its method (a :class:`QuantizedModel` for
    quantization)."""
    method = method_named(record.method)
    if method is None:
        raise ExportError(f"Run {record.id} ({record.method}) has no model to export.")
    return method.rebuild(loaded, record, progress)


def verify_in_llamacpp(loaded: LoadedModel, compressed: torch.nn.Module, gguf: str, windows,
                       progress: StageProgress | None = None) -> dict:
    """llama.cpp runs the exported file beside the dense and compressed in-app models on ``windows``
    (:func:`engine.llamacpp.agreement.verify_export`); without llama.cpp, a note saying why it was not run."""
    try:
        from engine.llamacpp.agreement import verify_export

        return verify_export(loaded.model, compressed, gguf, windows, stage_callback(progress, "llama.cpp check"))
    except LlamaCppUnavailable as err:
        return {"summary": f"Written, not checked in llama.cpp: {err}", "unavailable": str(err)}
    except Exception as err:  # noqa: BLE001 - the file is written and kept; say why llama.cpp could not run it
        return {"summary": f"Written; llama.cpp could not run it ({err}). The file may lack what llama.cpp needs "
                "(e.g. a tokenizer it reads).", "unavailable": str(err)}


def verification_windows(loaded: LoadedModel, record: RunRecord, n_windows: int = VERIFY_WINDOWS):
    """The first ``n_windows`` windows of the data the run was evaluated on (no more than the run used, so a
    preview's check runs on the preview's own windows and its in-app perplexity is the run's)."""
    fields = {k: record.data[k] for k in ("source", "split", "seqlen", "path", "offset") if k in record.data}
    if record.data.get("n_windows"):
        n_windows = min(n_windows, int(record.data["n_windows"]))
    spec = replace(DataSpec(**fields), n_windows=n_windows) if fields else DataSpec(n_windows=n_windows, seqlen=256)
    return token_windows(spec, loaded.tokenizer, loaded.max_seqlen)


def export_estimate(loaded: LoadedModel, record: RunRecord, has_model: bool = False,
                    verify_windows: int = VERIFY_WINDOWS, fmt: str = "gguf") -> str:
    """Rough wall time of an export to ``fmt``: rebuilding the model (unless the page holds it), writing,
    reloading, and perplexity of both models on the verification windows.

    Writing and reloading a folder (``hf``, ``ct``) runs at disk speed (a 462 MB fp32 folder: 1 s here); a GGUF
    file is reloaded through transformers' GGUF loader, which dequantizes every tensor in Python (12–24 s for
    the built-in model: docs/benchmarks.md, export round trips).
    """
    from engine.evaluation.latency import describe_seconds, estimate_seconds

    method = method_named(record.method)
    seconds = 0.0
    if not has_model and method is not None:
        seconds = method.rebuild_seconds(record)
    seqlen = int(record.data.get("seqlen", 256))
    seconds += estimate_seconds(loaded.model, verify_windows * seqlen, forward_passes=2.0)
    weight_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    if fmt == "gguf" and in_llamacpp_types(record):  # llama.cpp runs the file and its one-ulp copy: two passes
        positions = verify_windows * (seqlen - 1)  # four sides' log-softmax and four KL pairs per position
        seconds += 1.0 + weight_bytes / 1e9 + 2 * estimate_seconds(loaded.model, verify_windows * seqlen)
        seconds += positions * comparison_seconds_per_position(loaded.model.config.vocab_size)
        spec, bits = quantized_as(record)  # the app's model of llama.cpp's types runs the windows too
        seconds += verify_windows * extra_model_forward_seconds(loaded.model, loaded.architecture,
                                                                max(all_levels(bits)), seqlen, spec.ggml_types)
    elif fmt == "gguf":
        seconds += 6.0 + weight_bytes / 100e6  # transformers' GGUF loader: set-up, then ~100 MB/s
    else:
        seconds += 0.5 + weight_bytes / 1e9  # safetensors written and read back at ~1 GB/s
    return describe_seconds(seconds)


@explain_out_of_memory("The export")
def export_run(store: ResultsStore, loaded: LoadedModel, record: RunRecord, fmt: str, out: str | Path, *,
               overwrite: bool = False, model: torch.nn.Module | QuantizedModel | None = None,
               verify_windows: int = VERIFY_WINDOWS, dtype: str | None = None, gguf_types: str = "exact",
               progress: StageProgress | None = None) -> dict:
    """Write ``record``'s model as ``fmt`` into the folder ``out``, verify the round trip, store and return it.

    ``gguf_types``: ``"exact"`` (LayerLab's codes kept) or ``"compact"`` (nearest k-quants, re-quantized).
    ``dtype`` (Hugging Face and compressed-tensors folders): ``"float16"`` / ``"bfloat16"`` weights instead of
    the model's own (compressed-tensors: the unquantized tensors; codes and fp16 scales are kept).
    Returns (and appends to the run's ``config["exports"]``) ``{"format", "dtype", "folder", "bytes", "files",
    "remote_code", "seconds" (writing and reloading), "rebuild_s" (rebuilding the model from the record),
    "verification": RoundTrip dict, "summary", "notes": [str]}`` (compressed-tensors folders add "reader": what
    read the folder back for the check, and "vllm_problems").
    """
    check_export(loaded, record, fmt, out, overwrite, dtype)
    started = time.perf_counter()
    if model is None or (fmt in ("gguf", "ct") and not isinstance(model, QuantizedModel)):
        built = rebuild_model(loaded, record, progress)  # GGUF / ct pack the codes: the quantization cache has them
    else:
        built = model
    rebuild_s = time.perf_counter() - started
    notes = {"run": record.id, "model": record.model, "method": record.method, "series": record.series}
    try:
        if fmt == "hf":
            torch_model = built.model if isinstance(built, QuantizedModel) else built
            written = write_hf_folder(torch_model, loaded.architecture, out, loaded.tokenizer, overwrite, notes,
                                      dtype=getattr(torch, dtype) if dtype else None)
            reloaded = load_hf_folder(out)
        elif fmt == "ct":
            from engine.export.ct_folder import load_ct_folder, write_ct_folder

            torch_model = built.model  # written from the model the run quantized (a stack's: fewer layers)
            written = write_ct_folder(built, method_named(record.method).written_from(loaded, record), out,
                                      overwrite=overwrite, notes=notes, dtype=getattr(torch, dtype) if dtype else None)
            reloaded = load_ct_folder(out)
        else:
            from engine.export.gguf_file import load_gguf, write_gguf

            if not isinstance(built, QuantizedModel):
                raise ExportError("GGUF export needs the quantized model of a quantized run.")
            torch_model = built.model
            if built.spec.method == LLAMACPP:  # written from the model the run quantized (a stack's: fewer layers)
                base = method_named(record.method).written_from(loaded, record)
                written = write_llamacpp_gguf(built, base, out, overwrite=overwrite, notes=notes)
                reloaded = None
            else:
                written = write_gguf(built, loaded, out, overwrite=overwrite, notes=notes, mode=gguf_types)
                reloaded = load_gguf(out)
    except OSError as err:
        raise ExportError(f"Writing the export to '{out}' failed ({err}); nothing was left there. "
                          "Free some disk space or choose another folder.") from None
    seconds = time.perf_counter() - started - rebuild_s
    windows = verification_windows(loaded, record, verify_windows)
    if reloaded is None:  # llama.cpp's types: the deployed runtime itself checks the file
        check = verify_in_llamacpp(loaded, torch_model, written["file"], windows, progress)
        result = {"format": fmt, "dtype": "GGUF types", **written, "seconds": seconds, "rebuild_s": rebuild_s,
                  "llamacpp": check, "summary": check["summary"], "notes": written.get("notes", [])}
        store.add_export(record.id, result)
        return result
    exact = fmt != "gguf" or written.get("exact_fraction") == 1.0
    check = round_trip(torch_model, reloaded, windows, TOLERANCE[fmt] if exact else None)
    result = {"format": fmt, "dtype": dtype or str(next(torch_model.parameters()).dtype).removeprefix("torch."),
              **written, "seconds": seconds, "rebuild_s": rebuild_s, "verification": check.to_dict(),
              "summary": check.summary(), "notes": written.get("notes", [])}
    store.add_export(record.id, result)
    return result
