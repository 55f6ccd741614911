"""How good are the time estimates on the buttons?  Estimated vs measured wall time of each kind of work.

    python -m bench.estimates [--models smollm2-135m,gemma3-270m] [--sizes 16x256/16x256]

For each built-in model and data size (calibration windows x seqlen / evaluation windows x seqlen), with a
fresh cache (nothing cached: the first run a user makes), each button the pages offer, in the order a user
meets them: the baseline (Model), LR scores, slicing 25% LR-dynamic, RTN and GPTQ 4/3-bit LIM, dropping 4
layers by LR, a quantization preview (4 windows), a sweep of two RTN plans, a stack (drop 2, then 4-bit), an
export (GGUF of the RTN run, verified), a run in llama.cpp's types and its GGUF export (checked by llama.cpp,
when built), a stack for vLLM and its compressed-tensors export, and the Start page's guided run on its own
small data.  It prints the
estimate the button shows, the measured wall time of the same call and their ratio (measured / estimated;
1 is a perfect estimate; the target is 0.67-1.5).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--sizes", default="16x256/16x256")
    args = parser.parse_args()
    os.environ["LAYERLAB_CACHE"] = tempfile.mkdtemp(prefix="bench-estimates-")  # nothing cached
    (Path(os.environ["LAYERLAB_CACHE"]) / "models").symlink_to(Path(__file__).resolve().parents[1] / "cache" / "models")

    from bench.common import report
    from engine.core.data import DataSpec
    from engine.core.models import load_model
    from engine.evaluation.latency import estimate_seconds
    from engine.export.ct_folder import default_group_size
    from engine.llamacpp.runtime import status as llamacpp_status
    from engine.methods import method_for
    from engine.quant.runtimes import RUNTIMES
    from engine.runs.cached_scores import compute_scores
    from engine.runs.exports import export_estimate, export_formats, export_run
    from engine.runs.first_run import first_run_seconds, first_run_steps
    from engine.runs.plans import PREVIEW_WINDOWS, DropPlan, EvalPlan, QuantPlan, SlicingPlan, StackPlan
    from engine.runs.runner import estimate_run_seconds, evaluation_seconds, run, run_dense, scoring_seconds
    from engine.runs.store import ResultsStore
    from engine.runs.sweeps import quantization_sweep, run_sweep

    def seconds_of(text: str) -> float:  # "≈ 40 s" / "≈ 3 min" / "≈ 1.2 h" back to seconds
        value, unit = text.removeprefix("≈ ").split()[:2]
        return float(value) * {"s": 1, "min": 60, "h": 3600}[unit]

    SLICE, DROP = SlicingPlan("dynamic", 0.25, 0.1), DropPlan(count=4)
    RTN = QuantPlan(low_bits=3, low_fraction=0.5)
    GPTQ = QuantPlan(quantizer="gptq", low_bits=3, low_fraction=0.5, act_order=True)
    STACK = StackPlan(DropPlan(count=2), QuantPlan(high_bits=4, low_bits=4, low_fraction=0.0))
    LLAMACPP = QuantPlan("llama.cpp", high_bits=6, low_bits=4, low_fraction=0.5, runtime="llama.cpp")
    rows = []
    for name in args.models.split(","):
        loaded = load_model(name)
        estimate_seconds(loaded.model, 1)  # the throughput probe every estimate reads, measured once up front
        vllm_stack = StackPlan(DropPlan(count=2), QuantPlan(group_size=default_group_size(loaded, RUNTIMES["vllm"]),
                                                            high_bits=4, low_bits=4, low_fraction=0.0,
                                                            zero_point="symmetric", runtime="vllm"))
        for size in args.sizes.split(","):
            calib_text, eval_text = size.split("/")
            (cw, cs), (ew, es) = (map(int, calib_text.split("x")), map(int, eval_text.split("x")))
            calibration = DataSpec(split="calibration", seqlen=cs, n_windows=cw)
            evaluation = EvalPlan(DataSpec(split="evaluation", seqlen=es, n_windows=ew))
            preview = EvalPlan(replace(evaluation.data, n_windows=PREVIEW_WINDOWS), preview=True)
            store = ResultsStore(Path(tempfile.mkdtemp()) / "runs.sqlite")
            # other group sizes than RTN's: nothing comes from the quantization cache, as on a first visit
            fresh_preview = replace(RTN, low_bits=2, group_size=64)
            sweep = quantization_sweep(replace(RTN, group_size=32), [2], ["lim"], [0.25, 0.75])
            made = {}

            def keep(key, outcome):
                made[key] = outcome
                return outcome

            def exported():  # the run the Export panel would offer: GGUF of the RTN run where it can be one
                rtn = made["rtn"].record
                return (rtn, "gguf") if export_formats(rtn, loaded)["gguf"] is None else (made["drop"].record, "hf")

            runs = [
                ("baseline (Model)", lambda: evaluation_seconds(loaded, evaluation.data),
                 lambda: run_dense(store, loaded, evaluation)),
                ("LR scores", lambda: scoring_seconds(loaded, calibration),
                 lambda: compute_scores(store, loaded, calibration)),
                ("slicing 25% dynamic", lambda: estimate_run_seconds(loaded, SLICE, calibration, evaluation, store),
                 lambda: run(store, loaded, SLICE, calibration, evaluation)),
                ("RTN 4/3-bit", lambda: estimate_run_seconds(loaded, RTN, calibration, evaluation, store),
                 lambda: keep("rtn", run(store, loaded, RTN, calibration, evaluation))),
                ("GPTQ 4/3-bit", lambda: estimate_run_seconds(loaded, GPTQ, calibration, evaluation, store),
                 lambda: run(store, loaded, GPTQ, calibration, evaluation)),
                ("drop 4 layers", lambda: estimate_run_seconds(loaded, DROP, calibration, evaluation, store),
                 lambda: keep("drop", run(store, loaded, DROP, calibration, evaluation))),
                ("quantization preview", lambda: estimate_run_seconds(loaded, fresh_preview, calibration, preview,
                                                                      store),
                 lambda: run(store, loaded, fresh_preview, calibration, preview)),
                ("sweep of 2 RTN plans", lambda: sum(estimate_run_seconds(loaded, p, calibration, evaluation, store)
                                                     for p in sweep),
                 lambda: run_sweep(sweep, lambda p: run(store, loaded, p, calibration, evaluation))),
                ("stack: drop 2, then 4-bit", lambda: estimate_run_seconds(loaded, STACK, calibration, evaluation,
                                                                           store),
                 lambda: run(store, loaded, STACK, calibration, evaluation)),
                ("export (GGUF of the RTN run, else HF folder of the dropped model)",
                 lambda: seconds_of(export_estimate(loaded, exported()[0], fmt=exported()[1])),
                 lambda: export_run(store, loaded, *exported(), Path(tempfile.mkdtemp()) / "export")),
                ("llama.cpp types 6/4-bit", lambda: estimate_run_seconds(loaded, LLAMACPP, calibration, evaluation,
                                                                         store),
                 lambda: keep("llamacpp", run(store, loaded, LLAMACPP, calibration, evaluation))),
                ("its GGUF export (llama.cpp runs it and a one-ulp copy)",
                 lambda: seconds_of(export_estimate(loaded, made["llamacpp"].record, fmt="gguf")),
                 lambda: export_run(store, loaded, made["llamacpp"].record, "gguf", Path(tempfile.mkdtemp()) / "g")),
                ("stack for vLLM: drop 2, then 4-bit", lambda: estimate_run_seconds(loaded, vllm_stack, calibration,
                                                                                    evaluation, store),
                 lambda: keep("vllm_stack", run(store, loaded, vllm_stack, calibration, evaluation))),
                ("its compressed-tensors export", lambda: seconds_of(export_estimate(
                    loaded, made["vllm_stack"].record, fmt="ct")),
                 lambda: export_run(store, loaded, made["vllm_stack"].record, "ct", Path(tempfile.mkdtemp()) / "ct",
                                    dtype="float16")),
            ]
            refused = {"slicing 25% dynamic": SLICE, "GPTQ 4/3-bit": GPTQ, "llama.cpp types 6/4-bit": LLAMACPP}
            for label, estimate_of, run_one in runs:
                plan = refused.get(label)
                if plan is not None and method_for(plan).refusal(loaded, plan):
                    print(f"{name}: {label} not offered ({method_for(plan).refusal(loaded, plan)[:80]}...)")
                    continue
                if "llama.cpp" in label and not llamacpp_status().available or label.startswith("its GGUF") and (
                        "llamacpp" not in made):
                    print(f"{name}: {label} skipped (llama.cpp is not built here)")
                    continue
                estimate = estimate_of()  # what the button shows just before the click
                start = time.perf_counter()
                run_one()
                seconds = time.perf_counter() - start
                rows.append({"model": name, "data": size, "run": label, "estimated_s": round(estimate, 1),
                             "measured_s": round(seconds, 1), "measured_over_estimated": seconds / estimate})
                print(rows[-1], flush=True)
        store = ResultsStore(Path(tempfile.mkdtemp()) / "runs.sqlite")  # the Start page on a fresh store
        steps = first_run_steps(store, loaded)
        estimate = first_run_seconds(steps)
        start = time.perf_counter()
        for step in steps:
            step.run(None)
        seconds = time.perf_counter() - start
        rows.append({"model": name, "data": "guided run (8x128)", "run": "guided first run (Start)",
                     "estimated_s": round(estimate, 1), "measured_s": round(seconds, 1),
                     "measured_over_estimated": seconds / estimate})
        print(rows[-1], flush=True)
    report("estimates", rows, {"cache": "fresh (nothing cached)"})


if __name__ == "__main__":
    main()
