"""Every method at equal size on the built-in model: dropping (layers / attention / MLP) vs layer-wise quantization.

    python -m bench.methods [--sizes 0.9,0.75,0.6,0.5] [--eval-windows 16] [--quantizer rtn]

Plans come from ``engine.runs.sweeps.matched_size_sweep`` (each method's largest
model at or below each size, as a fraction of the dense model's bytes at 16 bits);
every run goes through the same runner as the dashboard, into a throw-away store,
with dense measured on the same wiki-offline *evaluation* windows. LR scores and
LIM orderings use the *calibration* split. Prints the equal-size table, the verdict
on the layer-wise quantization paper's claim, and the time per method.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from pathlib import Path

from bench.common import report
from engine.core.data import DataSpec
from engine.core.models import load_model
from engine.core.progress import Timer
from engine.runs.cached_scores import compute_scores
from engine.runs.plans import EvalPlan, QuantPlan
from engine.runs.runner import ensure_dense, run_dropping, run_quantization
from engine.runs.store import ResultsStore
from engine.runs.summary import quantization_vs_dropping
from engine.runs.sweeps import matched_size_sweep, parse_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="0.9,0.75,0.6,0.5")
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn")
    args = parser.parse_args()
    loaded = load_model("smollm2-135m")
    store = ResultsStore(Path(tempfile.mkdtemp(prefix="bench-methods-")) / "runs.sqlite")
    calibration = DataSpec("wiki-offline", "calibration", args.seqlen, args.calib_windows)
    evaluation = EvalPlan(DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows))
    compute_scores(store, loaded, calibration)
    dense = ensure_dense(store, loaded, evaluation)
    runners = {"dropping": run_dropping, "quantization": run_quantization}
    rows, seconds = [], defaultdict(float)
    for point in matched_size_sweep(loaded, parse_sizes(args.sizes), QuantPlan(quantizer=args.quantizer)):
        with Timer() as timer:
            outcome = runners[point.method](store, loaded, point.plan, calibration, evaluation)
        seconds[point.method] += timer.seconds
        m = outcome.metrics
        rows.append({"target": point.target, "method": point.method, "plan": point.plan.series(),
                     "detail": getattr(point.plan, "count", None) or
                     f"{point.plan.low_fraction:.0%} at {point.plan.low_bits} bits",
                     "size": m["size_fraction"], "ppl": m["ppl"], "ci": f"{m['ci_low']:.1f}-{m['ci_high']:.1f}",
                     "vs_dense": f"{m['ppl_change']:+.0%}", "seconds": timer.seconds})
    runs = store.runs_frame()
    verdict = quantization_vs_dropping(runs)
    meta = {"model": loaded.source, "dense_ppl": round(dense.metrics["ppl"], 3),
            "evaluation": dense.data_label, "calibration": calibration.label(), "quantizer": args.quantizer,
            "verdict": verdict, **{f"{k}_seconds": round(v, 1) for k, v in seconds.items()}}
    report("methods", rows, meta)
    print(f"\nVerdict on 'quantization beats dropping at equal size unless 2-bit': {verdict}")


if __name__ == "__main__":
    main()
