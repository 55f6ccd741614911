"""Export controls shared by the Slicing, Quantization, Dropping and Results pages."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from engine.core.data import DataError
from engine.core.models import LoadedModel
from engine.llamacpp.agreement import FLOOR_FACTOR, PPL_PROMISE
from engine.quant.layer_bits import all_levels
from engine.quant.runtimes import runtime_of
from engine.runs.exports import (
    FORMATS,
    TOLERANCE,
    VERIFY_WINDOWS,
    default_export_folder,
    export_archive,
    export_estimate,
    export_formats,
    export_run,
    gguf_type_lines,
    in_llamacpp_types,
    quantized_as,
)
from engine.runs.record import RunRecord
from engine.runs.store import ResultsStore
from ui.widgets import cancel_button, progress_callback

REMOTE_CODE_NOTE = (
    "Sliced models and models with attention / MLP blocks removed load with "
    "`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`: the folder carries a small modeling file "
    "(`modeling_layerlab.py`, torch and transformers only) that transformers runs on load. Read it before trusting "
    "it, as with any remote code. Models with whole layers removed are plain checkpoints and need no remote code."
)

CT_NOTE = (
    "compressed-tensors `pack-quantized` (the format llm-compressor writes): each layer's symmetric codes packed at "
    "its own width with fp16 scales. Load with `AutoModelForCausalLM.from_pretrained(folder)` once "
    "`pip install compressed-tensors` is done (transformers decompresses the weights on load), or serve it with "
    "vLLM on a GPU. No remote code."
)
CT_ZERO_POINT_NOTE = (
    "compressed-tensors `pack-quantized` (the format llm-compressor writes), asymmetric: each layer's codes and zero "
    "points packed at its own width with fp16 scales. Serve it with vLLM on a GPU (zero points at 4 bits: its "
    "`uint4` kernels). transformers 5.23 does not load compressed-tensors zero points, so the check reads the "
    "folder with compressed-tensors' own decompressor. No remote code."
)


def _run_label(record: RunRecord) -> str:
    ppl = record.metrics.get("ppl")
    return f"run {record.id} · {record.method} · {record.series}" + (f" · ppl {ppl:.2f}" if ppl else "")


def _export_row(e: dict) -> dict:
    row = {"format": e["format"], "weights / types": e.get("type_choice") or e.get("dtype", ""),
           "folder": e["folder"], "MiB on disk": round(e["bytes"] / 2**20, 2)}
    check = e.get("verification")
    if check is not None:
        return {**row, "checked by": e.get("reader", "transformers"), "ppl in app": round(check["ppl_in_app"], 3),
                "ppl reloaded": round(check["ppl_export"], 3), "change": f"{check['rel_diff']:+.3%}",
                "within promise": check["passed"]}
    llama = e.get("llamacpp", {})
    if "ppl" not in llama:
        return {**row, "checked by": "not checked (llama.cpp unavailable)"}
    kld = llama["kld"]
    return {**row, "checked by": "llama.cpp", "ppl in app": round(llama["ppl"]["LayerLab"], 3),
            "ppl reloaded": round(llama["ppl"]["llama.cpp"], 3), "change": f"{llama['ppl_gap']:+.3%}",
            "within promise": llama.get("passed", abs(llama["ppl_gap"]) <= PPL_PROMISE),
            "KLD to dense (app)": round(kld["dense -> LayerLab"]["mean"], 4),
            "KLD to dense (llama.cpp)": round(kld["dense -> llama.cpp"]["mean"], 4)}


def _exports_table(record: RunRecord) -> pd.DataFrame:
    return pd.DataFrame([_export_row(e) for e in record.config.get("exports", [])])


def _bytes_text(result: dict) -> str:
    """``"404.1 MiB of weights; 435.9 MiB on disk with the tokenizer and config"``: the weights are what the run's
    size counts; a GGUF file holds everything."""
    weights = result.get("weights_bytes")
    if weights is None or weights == result["bytes"]:
        return f"{result['bytes'] / 2**20:.1f} MiB on disk"
    return (f"{weights / 2**20:.1f} MiB of weights; {result['bytes'] / 2**20:.1f} MiB on disk with the tokenizer "
            "and config")


def _show_result(result: dict) -> None:
    passed = _export_row(result).get("within promise")
    (st.warning if passed is False or "unavailable" in result.get("llamacpp", {}) else st.success)(
        f"Exported to `{result['folder']}` ({_bytes_text(result)}, {result['seconds']:.1f} s). "
        + result["summary"])
    for note in result.get("notes", []):
        st.caption(note)
    data, name, mime = export_archive(result)
    st.download_button(f"Download {name}", data, name, mime, key=f"download_{result['folder']}")


def export_section(store: ResultsStore, loaded: LoadedModel, method: str | None, key: str) -> None:
    """Pick a stored run of the loaded model (of ``method``, or any), a format and a folder; export on a button."""
    records = [r for r in store.runs(model=loaded.source, method=method)
               if r.method != "dense" and r.model_fingerprint == loaded.fingerprint]
    if not records:
        st.caption("No runs of the loaded model to export yet: run one above first.")
        return
    by_id = {r.id: r for r in records}
    # the key names the newest run: a run made since the last rerun becomes the selection
    chosen = st.selectbox("Run to export", list(by_id), format_func=lambda i: _run_label(by_id[i]),
                          key=f"{key}_export_run_{records[0].id}",
                          help="Newest first. The model is rebuilt from the run's record (same layers, dims or bits).")
    record = by_id[chosen]
    runtime = runtime_of(record.config)
    if record.config.get("target_runtime"):
        st.caption(f"Run {record.id} was made for **{runtime.label}**" + (
            "." if runtime.deployable else ": LayerLab's free grid, exported as measured; each format says below "
            "what runs it."))
    reasons = export_formats(record, loaded)
    available = [fmt for fmt, reason in reasons.items() if reason is None]
    for fmt, reason in reasons.items():
        if reason:
            st.caption(f"{FORMATS[fmt]}: {reason}")
    if not available:
        return
    fmt = st.radio("Format", available, format_func=FORMATS.get, horizontal=True, key=f"{key}_export_format")
    gguf_types = "exact"
    llamacpp_run = in_llamacpp_types(record)
    if fmt == "gguf" and llamacpp_run:
        lines = gguf_type_lines(loaded, record)
        st.markdown("**Tensor types in the file** (llama.cpp's own, as the run holds them):\n"
                    + "\n".join(f"- {line}" for line in lines))
        st.caption("After writing, llama.cpp itself runs the file beside the dense and the in-app model on "
                   f"{VERIFY_WINDOWS} evaluation windows of the run: perplexity and KL divergence to dense, as "
                   f"llama.cpp computes them, and once more with one norm vector one ulp larger: how far llama.cpp's "
                   "own rounding of activations moves it (about 1% perplexity on 4 windows). Promise: perplexity "
                   f"within ±{PPL_PROMISE:.1%} of the app's, or the app no further from llama.cpp than "
                   f"{FLOOR_FACTOR}× that floor's KL divergence.")
    elif fmt == "gguf":
        gguf_types = st.radio("Tensor types", ["exact", "compact"], horizontal=True, key=f"{key}_export_types",
                              format_func={"exact": "exact (LayerLab's codes kept)",
                                           "compact": "compact (nearest k-quants, re-quantized)"}.get,
                              help="exact: the file computes what the app measured; 2- and 3-bit layers take "
                              "Q4_1's space. compact: smaller, but re-quantizing rounds a second time.")
        try:
            lines = gguf_type_lines(loaded, record, gguf_types)
        except ValueError as err:
            st.warning(str(err))
            return
        st.markdown("**Tensor types in the file** (embeddings F16, norms F32):\n"
                    + "\n".join(f"- {line}" for line in lines))
        st.caption("Exact types need a group size that is a multiple of 32; a float zero point is copied bit for "
                   "bit (an integer one is rounded to an fp16 minimum). Re-quantized tensors round a second time: "
                   f"the check below shows the difference (promise: ±{TOLERANCE['gguf']:.0%} for exact types).")
    if fmt == "ct":
        spec, bits = quantized_as(record) or (None, ())
        zero_points = spec is not None and any(spec.zero_point_at(b) == "integer" for b in all_levels(bits))
        note = CT_ZERO_POINT_NOTE if zero_points else CT_NOTE
        st.caption(note + f" Promise: perplexity within ±{TOLERANCE['ct']:.1%} of the app's.")
    dtype = None
    if fmt == "hf":
        st.caption(REMOTE_CODE_NOTE + f" Promise: perplexity within ±{TOLERANCE['hf']:.1%} of the app's.")
    if fmt in ("hf", "ct"):
        dtype = st.selectbox("Weights" if fmt == "hf" else "Unquantized tensors (embedding, head, norms)",
                             [None, "bfloat16", "float16"], key=f"{key}_export_dtype_{record.id}",
                             index=2 if fmt == "ct" and runtime.export == "ct" else 0,  # as its size was shown
                             format_func=lambda d: "as in the app (" + str(
                                 next(loaded.model.parameters()).dtype).removeprefix("torch.") + ")" if d is None
                             else f"{d} (half the bytes)",
                             help="16-bit weights halve the folder; the check shows what the rounding costs.")
    folder = st.text_input("Folder", str(default_export_folder(record, fmt)),
                           key=f"{key}_export_folder_{record.id}_{fmt}")
    overwrite = st.checkbox("Overwrite the folder if it exists", key=f"{key}_export_overwrite")
    left, right = st.columns(2)
    estimate = export_estimate(loaded, record, fmt=fmt)
    if left.button(f"Export and verify ({estimate})", key=f"{key}_export_go", type="primary",
                   help="Writes to a staging folder renamed at the end (never half-written), reloads it with "
                   "its runtime (llama.cpp for llama.cpp-type runs, else transformers) and compares perplexity "
                   f"with the in-app model on {VERIFY_WINDOWS} evaluation windows."):
        with right:
            cancel_button(f"{key}_export", "Cancel export")
        try:
            result = export_run(store, loaded, record, fmt, folder, overwrite=overwrite, dtype=dtype,
                                gguf_types=gguf_types,
                                progress=progress_callback("Exporting"))
        except (DataError, ValueError) as err:
            st.error(str(err))
        else:
            _show_result(result)
            record = store.get_run(record.id)
    table = _exports_table(record)
    if not table.empty:
        st.caption(f"Exports of run {record.id} (stored with the run):")
        st.dataframe(table, hide_index=True, width="stretch")
