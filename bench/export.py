"""Export round trips on the built-in model: formats x methods, size on disk, time, perplexity change.

    python -m bench.export [--eval-windows 4] [--seqlen 256] [--calib-windows 8]

Each row compresses the built-in model through the runner (stored in a
temporary results database), exports it with ``engine.runs.exports.export_run``
(the page's and CLI's path; the in-app model is passed in, so ``seconds`` is
writing + reloading, not compressing again) and reports the verification:
perplexity of the reloaded model (transformers; transformers' GGUF loader;
transformers with compressed-tensors)
against the in-app model on the same evaluation windows.  Targets: |change|
<= 0.5% for Hugging Face and compressed-tensors folders, <= 2% for GGUF files
whose types match the allocation exactly; export under 30 s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.common import report
from engine.core.data import DataSpec
from engine.core.models import load_model
from engine.runs.exports import export_run
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan
from engine.runs.runner import run_dropping, run_quantization, run_slicing
from engine.runs.store import ResultsStore

CASES = [  # (label, method, plan, format[, weights dtype of a Hugging Face folder, or GGUF type choice])
    ("drop 4 layers (LR)", "dropping", DropPlan("layer", 4, "lr"), "hf"),
    ("drop 4 layers (LR), bf16 weights", "dropping", DropPlan("layer", 4, "lr"), "hf", "bfloat16"),
    ("drop 4 attention blocks (LR)", "dropping", DropPlan("attention", 4, "attention"), "hf"),
    ("slice 25% constant", "slicing", SlicingPlan("constant", 0.25), "hf"),
    ("slice 25% LR-dynamic SB=10%", "slicing", SlicingPlan("dynamic", 0.25, 0.10), "hf"),
    ("slice 25% LR-dynamic SB=10%, fp16 weights", "slicing", SlicingPlan("dynamic", 0.25, 0.10), "hf", "float16"),
    ("RTN 4-bit g32 float zero", "quantization", QuantPlan("rtn", 32, 4, 4, 0.0, zero_point="float"), "gguf"),
    ("RTN 5/4-bit g32 float zero (50% at 4, LIM)", "quantization",
     QuantPlan("rtn", 32, 5, 4, 0.5, zero_point="float"), "gguf"),
    ("GPTQ 4-bit g32 float zero, act-order", "quantization",
     QuantPlan("gptq", 32, 4, 4, 0.0, zero_point="float", act_order=True), "gguf"),
    ("RTN 4-bit g128 integer zero (default grid)", "quantization", QuantPlan("rtn", 128, 4, 4, 0.0), "gguf"),
    ("RTN 4/2-bit g32 float zero (25% at 2, LIM)", "quantization",
     QuantPlan("rtn", 32, 4, 2, 0.25, zero_point="float"), "gguf"),
    ("RTN 4/2-bit g32 float zero (25% at 2, LIM)", "quantization",
     QuantPlan("rtn", 32, 4, 2, 0.25, zero_point="float"), "gguf", "compact"),
    ("RTN 4/3-bit g128 integer zero (50% at 3, LIM)", "quantization", QuantPlan("rtn", 128, 4, 3, 0.5), "gguf"),
    ("RTN 4/3-bit g128 integer zero (50% at 3, LIM)", "quantization", QuantPlan("rtn", 128, 4, 3, 0.5), "gguf",
     "compact"),
    ("GPTQ 4/3-bit g128 act-order (50% at 3, LIM)", "quantization",
     QuantPlan("gptq", 128, 4, 3, 0.5, act_order=True), "gguf"),
    ("RTN 8/6-bit g128 integer zero (50% at 6, LIM)", "quantization", QuantPlan("rtn", 128, 8, 6, 0.5), "gguf"),
    ("RTN 4/3-bit g64 symmetric (50% at 3, LIM)", "quantization",
     QuantPlan("rtn", 64, 4, 3, 0.5, zero_point="symmetric"), "gguf"),
    ("RTN 4/3-bit g64 symmetric (50% at 3, LIM)", "quantization",
     QuantPlan("rtn", 64, 4, 3, 0.5, zero_point="symmetric"), "ct"),
    ("RTN 4/2-bit g64 symmetric (25% at 2, LIM)", "quantization",
     QuantPlan("rtn", 64, 4, 2, 0.25, zero_point="symmetric"), "ct"),
    ("GPTQ 4/3-bit g64 symmetric, act-order (50% at 3, LIM)", "quantization",
     QuantPlan("gptq", 64, 4, 3, 0.5, zero_point="symmetric", act_order=True), "ct"),
    ("RTN 8/5-bit per-row symmetric (50% at 5, LIM)", "quantization",
     QuantPlan("rtn", None, 8, 5, 0.5, zero_point="symmetric"), "ct"),
    ("RTN 8/4-bit g64 integer zero for vLLM (50% at 4, LIM)", "quantization",
     QuantPlan("rtn", 64, 8, 4, 0.5, runtime="vllm"), "ct", "float16"),
    ("GPTQ 8/4-bit g64 integer zero for vLLM, act-order (50% at 4, LIM)", "quantization",
     QuantPlan("gptq", 64, 8, 4, 0.5, act_order=True, runtime="vllm"), "ct", "float16"),
]
RUNNERS = {"dropping": run_dropping, "slicing": run_slicing, "quantization": run_quantization}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--eval-windows", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=8)
    parser.add_argument("--only", default="", help="comma-separated case numbers (1-based) to run")
    args = parser.parse_args()
    loaded = load_model()
    calibration = DataSpec("wiki-offline", "calibration", args.seqlen, args.calib_windows)
    evaluation = EvalPlan(DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows))
    chosen = {int(i) for i in args.only.split(",") if i}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(Path(tmp) / "bench.sqlite")
        for number, (label, method, plan, fmt, *option) in enumerate(CASES, 1):
            dtype = option if fmt in ("hf", "ct") else []
            types = option[0] if fmt == "gguf" and option else "exact"
            if chosen and number not in chosen:
                continue
            outcome = RUNNERS[method](store, loaded, plan, calibration, evaluation)
            result = export_run(store, loaded, outcome.record, fmt, Path(tmp) / f"case-{number}", model=outcome.model,
                                verify_windows=args.eval_windows, dtype=dtype[0] if dtype else None,
                                gguf_types=types)
            check = result["verification"]
            rows.append({
                "case": label, "format": fmt + (f" ({dtype[0]})" if dtype else f" {types}" if fmt == "gguf" else ""),
                "MiB": result["bytes"] / 2**20,
                "types": ", ".join(f"{k}×{v}" for k, v in sorted(result.get("types", {}).items())) or "-",
                "exact": result.get("exact_fraction", 1.0), "export_s": result["seconds"],
                "rebuild_s": result["rebuild_s"],
                "ppl_app": check["ppl_in_app"], "ppl_export": check["ppl_export"], "change_%": 100 * check["rel_diff"],
                "promise_%": None if check["tolerance"] is None else 100 * check["tolerance"],
                "passed": check["passed"],
            })
            print(rows[-1], flush=True)
    report("export", rows, {"model": loaded.source, "verification": f"{args.eval_windows} x {args.seqlen} evaluation "
                            "windows", "calibration": calibration.label()})


if __name__ == "__main__":
    main()
