"""How good are the time estimates on the Run buttons?  Estimated vs measured wall time of each kind of run.

    python -m bench.estimates [--sizes 8x128/4x128,16x256/16x256]

For each data size (calibration windows x seqlen / evaluation windows x seqlen) and
each run the pages offer (LR scores, slicing 25% LR-dynamic, RTN and GPTQ 4/3-bit
LIM, dropping 4 layers by LR), on the built-in model with a fresh cache (nothing
cached: the first run a user makes), it prints the estimate the button shows, the
measured wall time of the same call and their ratio (measured / estimated; 1 is a
perfect estimate).  Dense is measured once per size first, as the Model page
would, so run estimates leave it out.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="8x128/4x128,16x256/16x256")
    args = parser.parse_args()
    os.environ["LAYERLAB_CACHE"] = tempfile.mkdtemp(prefix="bench-estimates-")  # nothing cached
    (Path(os.environ["LAYERLAB_CACHE"]) / "models").symlink_to(Path(__file__).resolve().parents[1] / "cache" / "models")

    from bench.common import report
    from engine.core.data import DataSpec
    from engine.core.models import load_model
    from engine.runs.cached_scores import compute_scores
    from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan
    from engine.runs.runner import (
        ensure_dense,
        estimate_run_seconds,
        run,
        scoring_seconds,
    )
    from engine.runs.store import ResultsStore

    loaded = load_model()
    SLICE, DROP = SlicingPlan("dynamic", 0.25, 0.1), DropPlan(count=4)
    RTN = QuantPlan(low_bits=3, low_fraction=0.5)
    GPTQ = QuantPlan(quantizer="gptq", low_bits=3, low_fraction=0.5, act_order=True)
    rows = []
    for size in args.sizes.split(","):
        calib_text, eval_text = size.split("/")
        (cw, cs), (ew, es) = (map(int, calib_text.split("x")), map(int, eval_text.split("x")))
        calibration = DataSpec(split="calibration", seqlen=cs, n_windows=cw)
        evaluation = EvalPlan(DataSpec(split="evaluation", seqlen=es, n_windows=ew))
        store = ResultsStore(Path(tempfile.mkdtemp()) / "runs.sqlite")
        ensure_dense(store, loaded, evaluation)
        runs = [
            ("LR scores", scoring_seconds(loaded, calibration), lambda: compute_scores(store, loaded, calibration)),
            ("slicing 25% dynamic", estimate_run_seconds(loaded, SLICE, calibration, evaluation, store),
             lambda: run(store, loaded, SLICE, calibration, evaluation)),
            ("RTN 4/3-bit", estimate_run_seconds(loaded, RTN, calibration, evaluation, store),
             lambda: run(store, loaded, RTN, calibration, evaluation)),
            ("GPTQ 4/3-bit", estimate_run_seconds(loaded, GPTQ, calibration, evaluation, store),
             lambda: run(store, loaded, GPTQ, calibration, evaluation)),
            ("drop 4 layers", estimate_run_seconds(loaded, DROP, calibration, evaluation, store),
             lambda: run(store, loaded, DROP, calibration, evaluation)),
        ]
        for name, estimate, run_one in runs:
            start = time.perf_counter()
            run_one()
            seconds = time.perf_counter() - start
            rows.append({"data": size, "run": name, "estimated_s": round(estimate, 1), "measured_s": round(seconds, 1),
                         "measured_over_estimated": seconds / estimate})
            print(rows[-1], flush=True)
    report("estimates", rows, {"model": loaded.source, "device": str(loaded.device),
                               "cache": "fresh (nothing cached)"})


if __name__ == "__main__":
    main()
