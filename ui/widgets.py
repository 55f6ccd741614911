"""Widgets several pages share: data choice, progress, outcome, trade-off chart, cancel."""

from __future__ import annotations

import time

import streamlit as st

from engine.core.data import SOURCES, DataError, DataSpec, save_upload, token_windows
from engine.core.models import LoadedModel
from engine.evaluation.latency import describe_seconds
from engine.quant.runtimes import RUNTIMES
from engine.runs.plans import DEFAULT_CALIB_SEQLEN, DEFAULT_CALIB_WINDOWS, DEFAULT_EVAL_SEQLEN, DEFAULT_EVAL_WINDOWS
from engine.runs.record import acc_key, acc_metric_key, acc_n_key, acc_stderr_key, accuracy_tasks
from engine.runs.summary import COST_THRESHOLD, change_text, run_warnings
from engine.viz.tradeoff import filter_runs, quality_axes, run_runtimes, size_axes, tradeoff_figure
from ui.report_pins import pin_button
from ui.session import current_model, results_store
from ui.state import keep_setting, kept, kept_value

DEFAULTS = {"calibration": (DEFAULT_CALIB_WINDOWS, DEFAULT_CALIB_SEQLEN),
            "evaluation": (DEFAULT_EVAL_WINDOWS, DEFAULT_EVAL_SEQLEN)}
PREFIX = {"calibration": "calib", "evaluation": "eval"}


def data_spec_controls(split: str, loaded: LoadedModel) -> DataSpec | None:
    """Source, windows and seqlen for the ``calibration`` or ``evaluation`` split, shared by every page.

    Shows how many windows will really be used; returns None (with a message shown) if unusable.
    """
    prefix = PREFIX[split]
    windows, seqlen = DEFAULTS[split]
    st.markdown(f"**{split.capitalize()} text** · " + (
        "scores, PCA and GPTQ are computed on it" if split == "calibration" else
        "perplexity is measured on it (dense and compressed on the same windows)"))
    cols = st.columns(3)
    source = cols[0].selectbox(
        f"{split.capitalize()} source", SOURCES, key=kept(f"{prefix}_source"),
        help="wiki-offline: Wikipedia sample bundled with gensim (works offline). "
        "wikitext2: needs the dataset cached or the hub reachable. file: your own UTF-8 text.",
    )
    n_windows = cols[1].number_input(f"{split.capitalize()} windows", 1, 4096, windows, key=kept(f"{prefix}_windows"))
    seq = cols[2].number_input(f"{split.capitalize()} seqlen (tokens)", 16, 32768, seqlen, step=16,
                               key=kept(f"{prefix}_seqlen"))
    path = None
    if source == "file":
        upload = st.file_uploader(f"{split.capitalize()} text file (UTF-8)", type=None, key=f"{prefix}_upload")
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
    spec = DataSpec(source=source, split=split, seqlen=int(seq), n_windows=int(n_windows), path=path)
    try:
        cut = token_windows(spec, loaded.tokenizer, loaded.max_seqlen)
    except DataError as err:
        st.error(str(err))
        return None
    st.caption(f"Uses {cut.usage()} = {cut.input_ids.numel():,} tokens of {spec.source} {split} text.")
    if cut.note:
        st.warning(cut.note)
    return spec


def _data_settings(calibration: DataSpec, evaluation: DataSpec) -> dict[str, object]:
    """The kept settings (names without ``keep.``) that :func:`data_spec_controls` reads, for these data specs."""
    return {f"{PREFIX[spec.split]}_{field}": value for spec in (calibration, evaluation)
            for field, value in (("source", spec.source), ("windows", spec.n_windows), ("seqlen", spec.seqlen))}


def use_data(calibration: DataSpec, evaluation: DataSpec) -> None:
    """Every page's calibration and evaluation settings become these specs' (a button's callback)."""
    for name, value in _data_settings(calibration, evaluation).items():
        keep_setting(name, value)


def uses_data(calibration: DataSpec, evaluation: DataSpec) -> bool:
    """Whether every page's calibration and evaluation settings already are these specs'."""
    return all(kept_value(name) == value for name, value in _data_settings(calibration, evaluation).items())


def calibration_and_evaluation(loaded: LoadedModel, evaluation: bool = True):
    """Labelled calibration and evaluation choosers plus zero-shot tasks: ``(calibration, evaluation, zero_shot)``."""
    with st.expander("Calibration and evaluation data (calibration and evaluation text never overlap)"):
        calibration = data_spec_controls("calibration", loaded)
        st.divider()
        spec = data_spec_controls("evaluation", loaded) if evaluation else None
        zero_shot = zero_shot_controls() if evaluation else {}
    return calibration, spec, zero_shot


RUNNING = "_running"
"""Session key of the long computation under way (its label, page, model, start and progress), cleared when the
script ends."""
PAGE = "_page_title"
"""Session key of the page being shown (the router sets it)."""
_WORK_SLOTS = "_work_slots"
"""Session key of what is shown only while work runs (Cancel buttons, progress bars on the page and in the
sidebar), drawn in this script run: emptied when it ends (:func:`computation_finished`)."""
_SIDEBAR_PROGRESS = "_sidebar_progress"
"""Session key of the sidebar's progress place in this script run."""


def progress_callback(label: str):
    """A progress bar on the page and in the sidebar (with a Cancel there), and a ``(stage, done, total)``
    callback that moves both and says the time left, re-estimated at every step from the stage's pace so far.

    Marks the computation as under way (:data:`RUNNING`) with how far it got: if the script is interrupted
    before it ends (the user left the page or clicked another control), the next run of any page says so and
    stores it as interrupted (:func:`interrupted_notice`).
    """
    loaded = current_model()
    mark = {"label": label, "page": st.session_state.get(PAGE, "its page"), "started": time.strftime("%H:%M:%S"),
            "model": loaded.source if loaded is not None else "", "completed": "started"}
    st.session_state[RUNNING] = mark
    holder = st.empty()  # emptied when the script ends (computation_finished): no "stay on this page" once done
    with holder.container():
        st.caption("Stay on this page until it finishes: leaving it, or clicking another control, stops the work; "
                   "the Results page then lists it as interrupted, with how far it got.")
        bar = st.progress(0.0, text=label)
    _until_the_script_ends(holder)
    side = _sidebar_slot().progress(0.0, text=f"Running: {label}")
    first_seen: dict[str, tuple[float, int]] = {}  # stage -> (when, steps done) at its first report

    def update(stage: str, done: int, total: int) -> None:
        fraction = min(1.0, done / max(total, 1))
        now = time.perf_counter()
        since, done_then = first_seen.setdefault(stage, (now, done))
        left = ""
        if done_then < done < total and now - since > 1.0:  # the stage's pace so far, corrected at every step
            pace = (now - since) / (done - done_then)
            left = f" · {describe_seconds(pace * (total - done))} left in this stage"
        mark["completed"] = f"{stage}: {done}/{total}"
        bar.progress(fraction, text=f"{label} · {stage}: {done}/{total}{left}")
        side.progress(fraction, text=f"Running: {label} · {stage} {done}/{total}{left}")

    return update


def _until_the_script_ends(*slots) -> None:
    """Empty these ``st.empty()`` slots when this script run ends: they belong to the work under way."""
    st.session_state.setdefault(_WORK_SLOTS, []).extend(slots)


def _sidebar_slot():
    """The sidebar's place for the running computation's progress, with a Cancel below it: made once per script
    run (a guided run's steps reuse it) and emptied with the Cancel buttons when the script ends."""
    if _SIDEBAR_PROGRESS not in st.session_state:
        progress, cancel = st.sidebar.empty(), st.sidebar.empty()
        cancel.button("Cancel", key="sidebar_cancel", on_click=_cancelled,
                      help="Stops this job; nothing half-done is stored.")
        st.session_state[_SIDEBAR_PROGRESS] = progress
        _until_the_script_ends(progress, cancel)
    return st.session_state[_SIDEBAR_PROGRESS]


def interrupted_notice() -> None:
    """Say so when the previous script run was interrupted while a computation was under way, store it as
    interrupted (unless the user cancelled it) and forget it."""
    for key in (_WORK_SLOTS, _SIDEBAR_PROGRESS):  # elements of an earlier script run: never touched again
        st.session_state.pop(key, None)
    found = st.session_state.pop(RUNNING, None)
    if found and found.get("cancelled"):
        st.info(f"Cancelled: {found['label']}. Nothing from the cancelled run was stored.")
    elif found:
        results_store().add_interrupted(model=found.get("model", ""), label=found["label"], page=found["page"],
                                        started=found["started"], completed=found.get("completed", "started"))
        st.warning(f"**{found['label']}** (started {found['started']} on {found['page']}) stopped before it "
                   f"finished, at {found.get('completed', 'its start')}: the page was left, or another control was "
                   "clicked. The Results page lists it as interrupted; its partial results were not stored as a run "
                   "(a sweep keeps the runs it completed). Start it again there.")


def computation_finished() -> None:
    """The script ended (normally or by ``st.stop()``): whatever ran in it ran to its end; its Cancel buttons go."""
    st.session_state.pop(RUNNING, None)
    st.session_state.pop(_SIDEBAR_PROGRESS, None)
    for slot in st.session_state.pop(_WORK_SLOTS, []):
        slot.empty()


def computed_on(loaded: LoadedModel, data_label: str) -> str:
    """Caption stating what a chart or number was computed on."""
    return f"Model {loaded.source} ({loaded.card['dtype']}, fingerprint {loaded.fingerprint}); data {data_label}."


def show_chart(fig, name: str, caption: str, table=None) -> None:
    """A Plotly chart with the project's own colours (no Streamlit theme), its caption, CSV and a report pin."""
    st.plotly_chart(fig, key=f"chart_{name}", theme=None, width="stretch")
    st.caption(caption)
    cols = st.columns(2)
    if table is not None:
        cols[0].download_button(
            f"{name}.csv", table.to_csv(index=table.index.name is not None).encode(),
            file_name=f"{name}.csv", mime="text/csv", key=f"csv_{name}", help="The data behind this chart",
        )
    with cols[1]:
        pin_button(fig, name, caption, table)


def cost_threshold() -> float:
    """The perplexity increase above which the summaries call every option too costly (a fraction)."""
    percent = st.number_input("Acceptable perplexity increase (%)", 0.0, 1000.0, COST_THRESHOLD * 100, 1.0,
                              key=kept("cost_threshold"),
                              help="The summary recommends only runs within this increase over dense, and says so "
                              "plainly when every stored option costs more.")
    return percent / 100


def show_outcome(outcome, loaded: LoadedModel) -> None:
    """Headline numbers of a finished run against dense on the same windows, and its warnings."""
    record = outcome.record
    m = record.metrics
    cols = st.columns(4)
    change = m.get("ppl_change")
    cols[0].metric("Perplexity", f"{m['ppl']:.2f}",
                   delta=None if change is None else f"{change:+.1%} vs dense {m['dense_ppl']:.2f}",
                   delta_color="inverse",
                   help=f"95% interval {m['ci_low']:.2f}–{m['ci_high']:.2f}; change {change_text(m)}, paired over "
                   f"the same windows as dense (run {m.get('dense_run')}).")
    cols[1].metric("Size vs dense (16-bit bytes)", f"{m['size_fraction']:.3f}")
    cols[2].metric("Parameters vs dense", f"{m['param_fraction']:.3f}")
    cols[3].metric("Compression time", f"{m['compress_s']:.1f} s",
                   help="Compressing only, before the evaluation (which takes most of a run): dropping layers is "
                   "nearly instant, and layers quantized before with the same settings come from the cache.")
    if m.get("kld_mean") is not None:
        cols = st.columns(4)
        cols[0].metric("KL divergence to dense", f"{m['kld_mean']:.4f}",
                       help="Mean over scored positions (nats per token) of KL(dense ‖ this model)'s next-token "
                       "distributions on the same windows, as llama.cpp's --kl-divergence reports it.")
        cols[1].metric("KLD median", f"{m['kld_median']:.4f}", help="Median over the same positions.")
        cols[2].metric("KLD 99th percentile", f"{m['kld_p99']:.3f}",
                       help="1% of positions diverge more than this (the tail a mean hides).")
        cols[3].metric("Same top token as dense", f"{m['same_top']:.1%}")
    show_accuracies(m)
    for warning in run_warnings(record):
        st.warning(warning)
    kind = "Preview" if record.is_preview else "Run"
    st.caption(computed_on(loaded, record.data_label) + f" {kind} stored as run {record.id}.")


def method_tradeoff(store, loaded: LoadedModel, method: str, evaluation: DataSpec, name: str) -> None:
    """Trade-off chart of this model's runs of one method plus dense; full evaluations or previews."""
    evaluation_label = token_windows(evaluation, loaded.tokenizer, loaded.max_seqlen).label()
    runs = store.runs_frame(model=loaded.source)
    if runs.empty:
        st.caption("No stored runs yet.")
        return
    runs = filter_runs(runs, fingerprint=loaded.fingerprint)
    own = filter_runs(runs, methods=[method])
    labels = list(dict.fromkeys([evaluation_label] + own["data_label"].tolist()))
    label = st.selectbox("Windows shown on the chart", labels, key=f"{method}_tradeoff_data",
                         help="Runs on different windows are never drawn together; previews use fewer windows.")
    shown = filter_runs(runs, methods=[method, "dense"], data_label=label)
    present = sorted(set(run_runtimes(shown[shown["method"] == method])))
    if len(present) > 1:  # runs made for other runtimes stay visible, labelled, and can be left out
        chosen = st.multiselect("Target runtimes shown", present, present, key=f"{method}_runtimes_{'_'.join(present)}",
                                format_func=lambda key: RUNTIMES[key].label if key in RUNTIMES else key)
        shown = shown[(shown["method"] == "dense") | run_runtimes(shown).isin(chosen)]
    axes = size_axes(shown[shown["method"] == method])
    if shown[shown["method"] == method].empty or not axes:
        st.caption(f"No {method} runs evaluated on {label} yet.")
        return
    x = st.radio("x axis", list(axes), format_func=axes.get, horizontal=True, key=f"{method}_x")
    qualities = {k: v for k, v in quality_axes(shown[shown["method"] == method]).items()
                 if k in ("metrics.ppl", "metrics.kld_mean")}
    y = st.radio("y axis", list(qualities), format_func=qualities.get, horizontal=True, key=f"{method}_y") \
        if len(qualities) > 1 else "metrics.ppl"
    what = "KL divergence to dense" if y == "metrics.kld_mean" else "perplexity"
    subtitle = f"{loaded.source}; {what} on {label}"
    columns = ["id", "method", "series", "preview", x, "metrics.ppl", "metrics.ci_low", "metrics.ci_high"]
    columns += [c for c in ("metrics.kld_mean", "metrics.kld_p99", "metrics.same_top") if c in shown]
    show_chart(tradeoff_figure(shown, x, y, subtitle), name,
               f"Computed on: {subtitle}. Dense (black star, dotted line) measured on the same windows; "
               "hollow dashed points are previews; the grey band is the Pareto frontier"
               + ("; bars are 95% intervals." if y == "metrics.ppl" else
                  "; KL divergence per scored position to dense's next-token distribution (0 = dense), as "
                  "llama.cpp's --kl-divergence reports it."), shown[columns])


def cancel_button(key: str, label: str = "Cancel run") -> None:
    """A button that stops the computation under way: shown only once it has started (call it right after the
    start button was clicked); clicking it reruns the page, which interrupts the run, and the next run says
    "Cancelled" (:func:`interrupted_notice`).

    Runs write to the store only when they finish, and no computation restarts on its own, so a
    cancelled run leaves nothing behind and stays stopped.
    """
    slot = st.empty()  # emptied when the script ends (computation_finished): no Cancel once nothing runs
    slot.button(label, key=f"cancel_{key}", help="Stops this job; nothing half-done is stored.",
                on_click=_cancelled)
    _until_the_script_ends(slot)


def _cancelled() -> None:
    found = st.session_state.get(RUNNING)
    if found:
        found["cancelled"] = True


def zero_shot_controls() -> dict:
    """Optional zero-shot tasks run on every evaluated model: ``{"tasks": (...), "task_limit": n}``."""
    from engine.evaluation.tasks import OFFLINE_TASKS
    from engine.evaluation.zeroshot import STANDARD_TASKS

    cols = st.columns([3, 1])
    tasks = cols[0].multiselect(
        "Zero-shot tasks (lm-eval, optional)", OFFLINE_TASKS + STANDARD_TASKS, key=kept("tasks"),
        help="The layerlab_wiki_* tasks work offline (built from wiki-offline evaluation articles); "
        "standard tasks need their datasets cached or the hub reachable.",
    )
    limit = cols[1].number_input("Items per task", 5, 5000, 100, key=kept("task_limit"))
    return {"tasks": tuple(tasks), "task_limit": int(limit)}


def show_accuracies(metrics: dict) -> None:
    """Zero-shot accuracies of a run, if any were measured."""
    tasks = accuracy_tasks(metrics)
    for task, col in zip(tasks, st.columns(max(len(tasks), 1))):
        stderr = metrics.get(acc_stderr_key(task))
        col.metric(f"{task} ({metrics[acc_metric_key(task)]})", f"{metrics[acc_key(task)]:.3f}",
                   help=f"± {stderr:.3f} (stderr), n = {metrics[acc_n_key(task)]}" if stderr else None)


def show_runs_table(table) -> None:
    """The compact run table (``engine.runs.summary.compact_table``) with readable number formats."""
    number = st.column_config.NumberColumn
    st.dataframe(table, hide_index=True, column_config={  # narrow id columns: the change vs dense fits at 1200 px
        "run": number(width="small"), "preview": st.column_config.CheckboxColumn(width="small"),
        "size vs dense (16-bit bytes)": number("size vs dense", format="%.3f",
                                               help="bytes against the same model at 16 bits"),
        "perplexity": number(format="%.2f"),
        "change vs dense": number(format="percent"), "speed vs dense": number(format="%.2f×"),
    })


def compute_scores_prompt(store, loaded: LoadedModel, calibration: DataSpec, need: str, missing=None) -> None:
    """When a preview needs scores (or a measurement) that are not cached: say so, offer the button (with its
    estimate), stop.  ``missing``: the :class:`ScoresNotComputed` raised, when it names its own computation."""
    from engine.runs.cached_scores import compute_scores
    from engine.runs.runner import scoring_estimate

    if missing is not None and missing.compute is not None:
        st.info(f"{need} needs the {missing.what} on this calibration text (not computed yet).")
        left, right = st.columns(2)
        if left.button(f"Compute the {missing.what} ({missing.estimate})", type="primary", key="compute_missing"):
            with right:
                cancel_button("measure")
            try:
                missing.compute(progress_callback(missing.what))
            except (DataError, ValueError) as err:
                st.error(str(err))
                st.stop()
            computation_finished()  # done and stored: the rerun below is not an interruption
            st.rerun()
        st.stop()
    st.info(f"{need} needs LR scores on this calibration text (not computed yet).")
    if st.button(f"Compute LR scores ({scoring_estimate(loaded, calibration)})", type="primary",
                 key="compute_lr_scores"):
        try:
            compute_scores(store, loaded, calibration, progress=progress_callback("LR scores"))
        except (DataError, ValueError) as err:
            st.error(str(err))
            st.stop()
        computation_finished()
        st.rerun()
    st.stop()


def preview_or_stop(preview, store, loaded: LoadedModel, calibration: DataSpec, need: str):
    """``preview()`` (a schedule, an allocation, a layer choice); on missing scores the compute prompt, on bad
    input its message, and the page stops there."""
    from engine.runs.cached_scores import ScoresNotComputed

    try:
        return preview()
    except ScoresNotComputed as missing:
        compute_scores_prompt(store, loaded, calibration, need, missing)
    except (DataError, ValueError) as err:
        st.error(str(err))
        st.stop()


def memory_note(loaded: LoadedModel, plan, calibration: DataSpec, evaluation, prepared=None) -> None:
    """The run's memory plan under its buttons: a caption, or a warning when it would not fit (the run
    then refuses to start, saying what would make it fit)."""
    from engine.runs.runner import run_memory

    try:
        memory = run_memory(loaded, plan, calibration, evaluation, prepared)
    except (DataError, ValueError):
        return  # the data error is shown where the data is chosen
    refusal = memory.refusal()
    if refusal:
        st.warning(refusal)
    else:
        st.caption(memory.summary())


def run_controls(loaded: LoadedModel, name: str, estimate: str, save_label: str, run) -> None:
    """Save option, Run button (with its time estimate), Cancel; ``run(save: bool)`` returns the outcome.

    Input errors are shown as messages; the outcome is shown against dense.
    """
    left, right = st.columns(2)
    save = left.checkbox(save_label, key=kept(f"{name}_save"))
    if left.button(f"Run {name} ({estimate})", type="primary", key=f"run_{name}",
                   help="Works on a copy (the loaded model is never changed), then measures it and dense on the "
                   "same windows."):
        with right:
            cancel_button(name)
        try:
            outcome = run(save)
        except (DataError, ValueError) as err:
            st.error(str(err))
        else:
            show_outcome(outcome, loaded)
            if outcome.config.get("saved_to"):
                st.success(f"Saved to {outcome.config['saved_to']}.")
