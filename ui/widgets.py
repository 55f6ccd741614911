"""Widgets several pages share: data choice, progress, captions."""

from __future__ import annotations

import streamlit as st

from engine.data import SOURCES, DataError, DataSpec, save_upload
from engine.models import LoadedModel


def data_spec_controls(
    key: str, split: str, loaded: LoadedModel, windows: int = 16, seqlen: int = 256
) -> DataSpec | None:
    """Source, windows and seqlen widgets; None (with a message shown) if unusable."""
    cols = st.columns(3)
    source = cols[0].selectbox(
        "Text", SOURCES, key=f"{key}_source",
        help="wiki-offline: Wikipedia sample bundled with gensim (works offline). "
        "wikitext2: needs the dataset cached or the hub reachable. file: your own UTF-8 text.",
    )
    n_windows = cols[1].number_input("Windows", 1, 4096, windows, key=f"{key}_windows")
    seq = cols[2].number_input("Seqlen (tokens)", 16, 32768, seqlen, step=16, key=f"{key}_seqlen")
    path = None
    if source == "file":
        upload = st.file_uploader("Text file (UTF-8)", type=None, key=f"{key}_upload")
        if upload is None:
            st.info("Upload a plain-text file to use it.")
            return None
        try:
            path = str(save_upload(upload.getvalue(), upload.name))
        except DataError as err:
            st.error(str(err))
            return None
    if seq > loaded.max_seqlen:
        st.error(f"Seqlen {seq} is longer than this model allows ({loaded.max_seqlen}). Choose less.")
        return None
    return DataSpec(source=source, split=split, seqlen=int(seq), n_windows=int(n_windows), path=path)


def progress_callback(label: str):
    """A Streamlit progress bar and a ``(stage, done, total)`` callback that moves it."""
    bar = st.progress(0.0, text=label)

    def update(stage: str, done: int, total: int) -> None:
        bar.progress(min(1.0, done / max(total, 1)), text=f"{label} · {stage}: {done}/{total}")

    return update


def computed_on(loaded: LoadedModel, data_label: str) -> str:
    """Caption stating what a chart or number was computed on."""
    return f"Model {loaded.source} ({loaded.card['dtype']}, fingerprint {loaded.fingerprint}); data {data_label}."


def chart_with_csv(fig, table, name: str, caption: str) -> None:
    """A Plotly chart, its caption, and a CSV download of the table behind it."""
    st.plotly_chart(fig, key=f"chart_{name}")
    st.caption(caption)
    st.download_button(
        f"Download {name}.csv", table.to_csv(index=table.index.name is not None).encode(),
        file_name=f"{name}.csv", mime="text/csv", key=f"csv_{name}",
    )


def calibration_and_evaluation(key: str, loaded: LoadedModel):
    """Two data choosers: calibration (scores, PCA, GPTQ) and evaluation (perplexity)."""
    with st.expander("Calibration and evaluation data", expanded=False):
        st.caption("Calibration text (scores, PCA, GPTQ) and evaluation text never overlap.")
        calibration = data_spec_controls(f"{key}_calib", "calibration", loaded, windows=16, seqlen=256)
        evaluation = data_spec_controls(f"{key}_eval", "evaluation", loaded, windows=8, seqlen=256)
        zero_shot = zero_shot_controls(key)
    return calibration, evaluation, zero_shot


def show_outcome(outcome, loaded: LoadedModel) -> None:
    """Headline numbers of a finished run and what it was computed on."""
    m = outcome.metrics
    cols = st.columns(4)
    cols[0].metric("Perplexity", f"{m['ppl']:.2f}", help=f"95% interval {m['ci_low']:.2f}–{m['ci_high']:.2f}")
    cols[1].metric("Parameters vs dense", f"{m['param_fraction']:.3f}")
    cols[2].metric("Bytes vs dense", f"{m['size_fraction']:.3f}")
    cols[3].metric("Compression time", f"{m['compress_s']:.1f} s")
    show_accuracies(m)
    st.caption(computed_on(loaded, outcome.data["label"]) + f" Stored as run {outcome.run_id}.")


def method_tradeoff(store, loaded: LoadedModel, method: str, evaluation_label: str, axes: dict[str, str]) -> None:
    """Trade-off chart of this model's stored runs of one method (plus dense) on one evaluation set."""
    from engine.tradeoff import tradeoff_figure, with_labels

    runs = store.runs_frame(model=loaded.source)
    if runs.empty or "data.label" not in runs:
        st.caption("No stored runs yet.")
        return
    runs = with_labels(runs)
    runs = runs[runs["method"].isin([method, "dense"]) & (runs["data.label"] == evaluation_label)]
    available = {k: v for k, v in axes.items() if k in runs and runs[k].notna().any()}
    if runs[runs["method"] == method].empty or not available:
        st.caption(f"No {method} runs evaluated on {evaluation_label} yet.")
        return
    x = st.radio("x axis", list(available), format_func=available.get, horizontal=True, key=f"{method}_x")
    subtitle = f"{loaded.source}; perplexity on {evaluation_label}"
    st.plotly_chart(tradeoff_figure(runs, x, "metrics.ppl", subtitle), key=f"{method}_tradeoff")
    st.caption(f"Computed on: {subtitle}. Circled points are Pareto-optimal.")


def cancel_button(key: str) -> None:
    """A button that stops a running computation: clicking it reruns the page, which interrupts the run.

    Runs write to the store only when they finish, so a cancelled run leaves nothing behind.
    """
    if st.button("Cancel run", key=f"cancel_{key}", help="Stops a running job; nothing half-done is stored."):
        st.info("Cancelled. Nothing from the interrupted run was stored.")


def zero_shot_controls(key: str) -> dict:
    """Optional zero-shot tasks run on every evaluated model: ``{"tasks": (...), "task_limit": n}``."""
    from engine.tasks import OFFLINE_TASKS
    from engine.zeroshot import STANDARD_TASKS

    cols = st.columns([3, 1])
    tasks = cols[0].multiselect(
        "Zero-shot tasks (lm-eval, optional)", OFFLINE_TASKS + STANDARD_TASKS, key=f"{key}_tasks",
        help="The layerlab_wiki_* tasks work offline (built from wiki-offline evaluation articles); "
        "standard tasks need their datasets cached or the hub reachable.",
    )
    limit = cols[1].number_input("Items per task", 5, 5000, 100, key=f"{key}_task_limit")
    return {"tasks": tuple(tasks), "task_limit": int(limit)}


def show_accuracies(metrics: dict) -> None:
    """Zero-shot accuracies of a run, if any were measured."""
    tasks = [k.removeprefix("acc.") for k in metrics if k.startswith("acc.")]
    for task, col in zip(tasks, st.columns(max(len(tasks), 1))):
        stderr = metrics.get(f"acc_stderr.{task}")
        col.metric(f"{task} ({metrics[f'acc_metric.{task}']})", f"{metrics[f'acc.{task}']:.3f}",
                   help=f"± {stderr:.3f} (stderr), n = {metrics[f'acc_n.{task}']}" if stderr else None)
