"""The CLI's command bodies: parsed arguments become plans, the engine runs them, one JSON line per stored run."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from engine.cli.parser import build_parser
from engine.core.data import DataSpec
from engine.core.models import load_model
from engine.core.paths import atomic_file
from engine.export.ct_folder import default_group_size
from engine.optimize.bit_budget import BitBudget
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES, Runtime
from engine.runs.bits_optimizer import BitsOptimizerPlan, optimize_bits
from engine.runs.cached_scores import compute_scores
from engine.runs.plans import (
    DropPlan,
    EvalPlan,
    QuantPlan,
    SlicingPlan,
    StackPlan,
)
from engine.runs.runner import ensure_dense, run_dense, run_memory, run_quantization, run_slicing
from engine.runs.runner import run as run_plan
from engine.runs.store import ResultsStore
from engine.runs.summary import quantization_vs_dropping, run_warnings
from engine.runs.sweeps import matched_size_sweep, parse_sizes, quantization_sweep, run_sweep, slicing_sweep
from engine.sensitivity.cached import cached_agreement, measure_sensitivity, sensitivity_summary
from engine.sensitivity.findings import sensitivity_finding


def _specs(args) -> tuple[DataSpec | None, EvalPlan | None]:
    path = args.text_file
    calibration = evaluation = None
    if hasattr(args, "calib_windows"):
        calibration = DataSpec(args.data, "calibration", args.calib_seqlen, args.calib_windows, path)
    if hasattr(args, "eval_windows"):
        tasks = tuple(t for t in args.tasks.split(",") if t)
        evaluation = EvalPlan(DataSpec(args.data, "evaluation", args.eval_seqlen, args.eval_windows, path),
                              tasks, args.limit)
    return calibration, evaluation


def group_size(given: int | None, loaded, runtime: Runtime) -> int | None:
    """``--group-size`` as plans take it: as given, ``0`` for one scale per row (``None``), and when not given
    128 or the largest below it the runtime's checkpoint holds for the model (:func:`default_group_size`)."""
    if given is None:
        return default_group_size(loaded, runtime)
    return given or None


def _print_run(outcome) -> None:
    """One JSON line per stored run (a ``RunOutcome`` or a ``RunRecord``; ``kind``: its method), warnings on
    stderr."""
    record = getattr(outcome, "record", outcome)
    kind = record.method
    for warning in run_warnings(record):
        print(f"warning: {warning}", file=sys.stderr)
    shown = {k: v for k, v in record.metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
             and not k.startswith("acc_n")}
    print(json.dumps({"run": record.id, "kind": kind, "series": record.series, "data": record.data_label,
                      **{k: round(v, 5) for k, v in shown.items()}}))


def _progress(stage: str, done: int, total: int) -> None:
    print(f"\r{stage}: {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def _export(args) -> None:
    """Export a stored run (its model is loaded first), print the written files and the round-trip check."""
    from engine.runs.exports import export_run

    store = ResultsStore(args.store)
    try:
        record = store.get_run(args.run_id)
    except KeyError:
        raise ValueError(f"There is no stored run {args.run_id}: see the Results page for run ids.") from None
    loaded = load_model(args.model or record.model, device=args.device, dtype=args.dtype,
                        trust_remote_code=args.trust_remote_code)
    result = export_run(store, loaded, record, args.format, args.out, overwrite=args.overwrite,
                        verify_windows=args.verify_windows, dtype=args.dtype_out,
                        gguf_types=args.gguf_types, progress=_progress)
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    print(json.dumps({k: result[k] for k in ("format", "folder", "bytes", "files", "remote_code", "seconds",
                                             "verification", "llamacpp", "vllm_problems") if k in result},
                     default=float))
    llama = result.get("llamacpp", {})
    if result.get("verification", {}).get("passed") is False or "unavailable" in llama or llama.get("passed") is False:
        print(f"warning: {result['summary']}", file=sys.stderr)
    elif "llamacpp" in result:
        print(result["summary"], file=sys.stderr)


PLANS = {
    "slice": lambda args: SlicingPlan(args.schedule, args.target, args.basis, tuple(args.fractions), args.round_to,
                                      args.final_rotation),
    "quantize": lambda args: QuantPlan(args.quantizer, args.group_size, args.high_bits, args.low_bits,
                                       args.low_fraction, args.target_bits, args.ordering, tuple(args.custom_order),
                                       args.seed, args.zero_point or RUNTIMES[args.runtime].default_zero_point,
                                       args.act_order, args.ggml_types, args.imatrix,
                                       args.output_type, args.runtime),
    "drop": lambda args: DropPlan(args.blocks, args.count, args.by, not args.no_protect, tuple(args.layers),
                                  args.iterative),
    "stack": lambda args: StackPlan(SlicingPlan("constant", args.slice, final_rotation=True) if args.slice is not None
                                    else DropPlan("layer", args.drop_layers),
                                    QuantPlan(args.quantizer, args.group_size, args.quantize_bits,
                                              args.quantize_bits, 0.0,
                                              zero_point=RUNTIMES[args.runtime].default_zero_point,
                                              ggml_types=args.ggml_types, imatrix=args.imatrix,
                                              output_type=args.output_type, runtime=args.runtime)),
}
"""Commands that run one plan: how each builds its plan from the arguments (the runner does the rest)."""


def run(args) -> None:
    if args.command == "export":
        return _export(args)
    store = ResultsStore(args.store)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                        device_map=args.device_map)
    calibration, evaluation = _specs(args)
    if hasattr(args, "group_size"):
        args.group_size = group_size(args.group_size, loaded, RUNTIMES[getattr(args, "runtime", DEFAULT_RUNTIME)])
    if args.command == "score":
        lr, zd, hit = compute_scores(store, loaded, calibration, args.k, progress=_progress)
        print(json.dumps({"cached": hit, "data": lr.data_label, "lr": lr.lr, "zd": zd.zd_layer}))
    elif args.command == "evaluate":
        _print_run(run_dense(store, loaded, evaluation, _progress))
    elif args.command in PLANS:
        plan = PLANS[args.command](args)
        _print_memory(loaded, plan, calibration, evaluation)
        _print_run(run_plan(store, loaded, plan, calibration, evaluation, save_to=getattr(args, "save", None),
                            progress=_progress))
    elif args.command == "sweep-slicing":
        _sweep_slicing(args, store, loaded, calibration, evaluation)
    elif args.command == "sensitivity":
        _sensitivity(args, store, loaded, calibration)
    elif args.command == "optimize-slicing":
        _optimize_slicing(args, store, loaded, calibration, evaluation)
    elif args.command == "optimize-bits":
        _optimize_bits(args, store, loaded, calibration, evaluation)
    elif args.command == "sweep-methods":
        _sweep_methods(args, store, loaded, calibration, evaluation)
    else:
        _sweep_quantization(args, store, loaded, calibration, evaluation)


def _sweep_slicing(args, store, loaded, calibration, evaluation) -> None:
    schedules = [s for s in args.schedules.split(",") if s]
    if not set(schedules) <= {"constant", "dynamic"}:
        raise ValueError(f"--schedules takes constant and/or dynamic, got '{args.schedules}'")
    base = SlicingPlan(round_to=args.round_to, final_rotation=args.final_rotation)
    plans = slicing_sweep(base, args.targets, args.bases, schedules)
    _run_sweep(plans, store, loaded, calibration, evaluation)


def _sweep_quantization(args, store, loaded, calibration, evaluation) -> None:
    base = QuantPlan(args.quantizer, args.group_size, args.high_bits, seed=args.seed,
                     zero_point=args.zero_point or RUNTIMES[args.runtime].default_zero_point,
                     act_order=args.act_order, ggml_types=args.ggml_types, imatrix=args.imatrix,
                     output_type=args.output_type, runtime=args.runtime)
    plans = quantization_sweep(base, args.low_bits, [o for o in args.orderings.split(",") if o], args.low_fractions)
    _run_sweep(plans, store, loaded, calibration, evaluation)


def _sweep_methods(args, store, loaded, calibration, evaluation) -> None:
    """Dense, then dropping and quantization at each size; prints every run and the verdict on the papers' claim."""
    points = matched_size_sweep(loaded, parse_sizes(args.sizes), QuantPlan(quantizer=args.quantizer))
    compute_scores(store, loaded, calibration, progress=_progress)
    _run_sweep(points, store, loaded, calibration, evaluation)
    label = ensure_dense(store, loaded, evaluation).data_label
    runs = store.runs_frame(model=loaded.source)
    verdict = quantization_vs_dropping(runs[(runs["fingerprint"] == loaded.fingerprint)
                                            & (runs["data_label"] == label)])
    print(json.dumps({"verdict": verdict}))
    if args.json:
        rows = [{"method": p.method, "plan": p.plan.series(), "target": p.target, "predicted_size": p.predicted_size}
                for p in points]
        with atomic_file(args.json) as temp:
            temp.write_text(json.dumps({"data": label, "planned": rows, "verdict": verdict}, indent=2))


def _sensitivity(args, store, loaded, calibration) -> None:
    """Measure (or load) every action on every layer, score agreement, print the finding, write ``--json``."""
    actions = args.actions
    matrix = measure_sensitivity(store, loaded, calibration, actions, batch_size=args.batch_size, progress=_progress)
    lr, zd, _hit = compute_scores(store, loaded, calibration, args.k, progress=_progress)
    rows = cached_agreement(store, loaded, matrix, lr, zd)
    summary = sensitivity_summary(loaded, matrix, rows, sensitivity_finding(rows, actions))
    if args.json:
        with atomic_file(args.json) as temp:
            temp.write_text(json.dumps(summary, indent=2))
    print(json.dumps({"finding": summary["finding"], "data": summary["data"], "json": args.json,
                      "cached": {d.spec.key: hit for d, hit in zip(matrix.damages, matrix.cached)},
                      "kl": {d.spec.key: [round(v, 6) for v in d.kl] for d in matrix.damages}}))


def _optimize_bits(args, store, loaded, calibration, evaluation) -> None:
    """Optimize (cached), print every candidate, evaluate the chosen allocation (stored), write ``--json``."""
    plan = BitsOptimizerPlan(BitBudget(avg_bits=args.avg_bits, total_bytes=args.bytes), tuple(args.levels),
                             args.quantizer, args.group_size, args.candidates, args.held_out,
                             args.granularity, runtime=args.runtime)
    result = optimize_bits(store, loaded, plan, calibration, progress=_progress)
    for row in result.table().to_dict("records"):
        print(json.dumps({"candidate": row}, default=float))
    print(json.dumps({"summary": result.summary()}))
    _print_run(ensure_dense(store, loaded, evaluation, _progress))
    outcome = run_quantization(store, loaded, plan.quant_plan(result.best.ordering, result.best.bits), calibration,
                               evaluation, allocation=result.allocation(), progress=_progress)
    _print_run(outcome)
    if args.json:
        with atomic_file(args.json) as temp:
            temp.write_text(json.dumps({**result.to_dict(), "summary": result.summary(), "run": outcome.run_id,
                                        "evaluation": outcome.record.data_label, "eval_ppl": outcome.metrics["ppl"]},
                                       indent=2))


def _optimize_slicing(args, store, loaded, calibration, evaluation) -> None:
    """Search (cached), print every candidate, evaluate the chosen schedule (stored), write ``--json``."""
    from engine.runs.slicing_optimizer import SlicingOptimizerPlan, optimize_slicing

    plan = SlicingOptimizerPlan(args.target, tuple(args.fractions), args.round_to, args.held_out, args.sb_checks)
    result = optimize_slicing(store, loaded, plan, calibration, progress=_progress)
    for row in result.table().to_dict("records"):
        print(json.dumps({"candidate": row}, default=float))
    print(json.dumps({"summary": result.summary()}))
    _print_run(ensure_dense(store, loaded, evaluation, _progress))
    hidden = loaded.hidden_size
    outcome = run_slicing(store, loaded, result.best.plan(plan.target, plan.round_to, hidden), calibration,
                          evaluation, schedule=result.best.schedule(hidden), progress=_progress)
    _print_run(outcome)
    if args.json:
        with atomic_file(args.json) as temp:
            temp.write_text(json.dumps({**result.to_dict(), "summary": result.summary(), "run": outcome.run_id,
                                        "evaluation": outcome.record.data_label, "eval_ppl": outcome.metrics["ppl"]},
                                       indent=2, default=float))


def _print_memory(loaded, plan, calibration, evaluation) -> None:
    """The run's memory plan on stderr before it starts (a run that does not fit is refused by the runner)."""
    print(run_memory(loaded, plan, calibration, evaluation).summary(), file=sys.stderr)


def _run_sweep(plans, store, loaded, calibration, evaluation) -> None:
    """Dense first (the reference on the same windows), then every point; failed points are reported, not fatal."""
    _print_run(ensure_dense(store, loaded, evaluation, _progress))  # stored once per windows
    result = run_sweep(plans, lambda plan: run_plan(store, loaded, getattr(plan, "plan", plan), calibration,
                                                    evaluation, progress=_progress))
    for outcome in result.outcomes:
        _print_run(outcome)
    for plan, message in result.errors:
        print(f"warning: skipped {plan}: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries our progress and errors only
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as err:  # every engine input error is a ValueError subclass
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
