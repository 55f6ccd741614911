"""llama.cpp's stock presets against LayerLab's bits optimizer at each preset's file size, measured by llama.cpp.

    python -m bench.llamacpp [--models smollm2-135m,gemma3-270m] [--presets Q2_K,Q3_K_S,...]
                             [--eval 8x512] [--calib 8x512] [--imatrix off,on]

For each built-in model: the in-app model is written as an F32 GGUF (the input
``llama-quantize`` starts from); LayerLab's importance matrix is collected on
the calibration windows and written as a GGUF imatrix file.  For each preset
and imatrix setting:

- llama.cpp: ``llama-quantize [--imatrix] model-f32.gguf preset.gguf PRESET``;
- LayerLab: the bits optimizer with the llama.cpp quantizer (levels 2, 3, 4, 5,
  6, 8 = Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_0 with llama.cpp's fallbacks), one
  level per layer, budget = the preset file's bytes; its allocation quantized
  (with the same imatrix when on) and written as an exact GGUF file.

Every file is run by llama.cpp itself on the same evaluation windows (BOS each
window where the tokenizer adds one) and compared with llama.cpp running the
F32 file: file MB, bits per weight, mean and 99% KL divergence, same top token,
perplexity.  KL divergence uses LayerLab's bounded dense reference (top-64 and
tail samples of the F32 model's distribution: engine.evaluation.divergence),
recorded from llama.cpp's F32 logits.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import tempfile
import time
from pathlib import Path

PRESETS = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M")


def _size(text: str) -> tuple[int, int]:
    n, seqlen = text.lower().split("x")
    return int(n), int(seqlen)


def _measure(gguf: Path, windows, reference, perplexity_of) -> dict:
    """llama.cpp's perplexity and KL divergence to the F32 reference of ``gguf`` on ``windows``."""
    from engine.evaluation.divergence import DivergenceMeter

    meter = DivergenceMeter(reference)
    ppl = perplexity_of(gguf, meter.observe)
    d = meter.result()
    return {"ppl": ppl, "kld_mean": d.mean, "kld_p99": d.p99, "same_top": d.same_top}


def _llamacpp_perplexity(windows):
    """A function running a GGUF in llama.cpp on ``windows`` and returning its perplexity (observer sees logits)."""
    import numpy as np
    import torch

    from engine.llamacpp.agreement import _logits_fn

    def run(gguf: Path, observer) -> float:
        logits_of = _logits_fn(str(gguf), windows.seqlen)
        nll, t = 0.0, windows.seqlen - 1
        for w, ids in enumerate(windows.input_ids):
            logits = torch.from_numpy(logits_of(ids))
            observer(w * t + torch.arange(t), logits)
            logp = torch.log_softmax(logits.double(), dim=-1)
            nll -= float(logp[np.arange(t), ids[1:]].sum())
        return math.exp(nll / (windows.n_windows * t))
    return run


def bench_model(name: str, presets: list[str], evaluation: tuple[int, int], calibration: tuple[int, int],
                imatrix_settings: list[bool], work: Path) -> list[dict]:
    from engine.core.data import DataSpec, token_windows
    from engine.core.models import load_model
    from engine.evaluation.divergence import DenseReference
    from engine.export.gguf_llamacpp import layout, write_float_gguf, write_llamacpp_gguf
    from engine.llamacpp.runtime import tool
    from engine.optimize.bit_budget import BitBudget
    from engine.quant.grid import LLAMACPP, QuantizerSpec
    from engine.quant.imatrix import collect_importance, write_imatrix_gguf
    from engine.quant.quantize_model import quantize_model
    from engine.runs.bits_optimizer import BitsOptimizerPlan, optimize_bits
    from engine.runs.store import ResultsStore

    loaded = load_model(name)
    f32 = write_float_gguf(loaded, work / name / "f32", overwrite=True)
    eval_windows = token_windows(DataSpec(split="evaluation", n_windows=evaluation[0], seqlen=evaluation[1]),
                                 loaded.tokenizer, loaded.max_seqlen)
    calib_spec = DataSpec(split="calibration", n_windows=calibration[0], seqlen=calibration[1])
    calib_windows = token_windows(calib_spec, loaded.tokenizer, loaded.max_seqlen)
    perplexity_of = _llamacpp_perplexity(eval_windows)
    reference = DenseReference.empty(eval_windows.n_windows * (eval_windows.seqlen - 1))
    f32_ppl = perplexity_of(f32, reference.observe)
    entries, _ = layout(loaded, QuantizerSpec(method=LLAMACPP, bits=8), tuple([8] * loaded.num_layers))
    names = {(e.layer, e.linear): e.name for e in entries if e.role == "linear"}
    imatrix_file = write_imatrix_gguf(collect_importance(loaded, calib_windows), names, work / name / "imatrix.gguf",
                                      calib_windows.seqlen)
    n_weights = sum(p.numel() for p in loaded.model.parameters())
    store = ResultsStore(work / name / "results.sqlite")
    rows = [{"model": name, "file": "F32 (llama.cpp)", "imatrix": "-", "MB": f32.stat().st_size / 1e6,
             "bpw": 8 * f32.stat().st_size / n_weights, "ppl": f32_ppl, "kld_mean": 0.0, "kld_p99": 0.0,
             "same_top": 1.0}]
    print(rows[0], flush=True)
    for use_imatrix in imatrix_settings:
        for preset in presets:
            out = work / name / f"{preset}{'-imatrix' if use_imatrix else ''}.gguf"
            command = [str(tool("llama-quantize"))] + (["--imatrix", str(imatrix_file)] if use_imatrix else [])
            subprocess.run(command + [str(f32), str(out), preset], check=True, capture_output=True)
            size = out.stat().st_size
            row = {"model": name, "file": f"llama.cpp {preset}", "imatrix": "on" if use_imatrix else "off",
                   "MB": size / 1e6, "bpw": 8 * size / n_weights, **_measure(out, eval_windows, reference,
                                                                               perplexity_of)}
            rows.append(row)
            print(row, flush=True)
            started = time.perf_counter()
            plan = BitsOptimizerPlan(BitBudget(total_bytes=float(size)), (2, 3, 4, 5, 6, 8), LLAMACPP,
                                     candidates=3, held_out_windows=4, imatrix=use_imatrix)
            try:
                result = optimize_bits(store, loaded, plan, calib_spec)
            except ValueError as err:  # a budget the levels cannot reach: say so in the table
                rows.append({"model": name, "file": f"LayerLab at {preset}'s size", "imatrix": row["imatrix"],
                             "note": str(err)[:120]})
                continue
            spec = QuantizerSpec(method=LLAMACPP, bits=8, imatrix=use_imatrix)
            quantized = quantize_model(loaded, result.allocation(), calib_windows if use_imatrix else None,
                                       spec=spec)
            written = write_llamacpp_gguf(quantized, loaded, work / name / f"layerlab-{out.stem}", overwrite=True)
            mine = {"model": name, "file": f"LayerLab at {preset}'s size ({result.best.name})",
                    "imatrix": row["imatrix"], "MB": written["bytes"] / 1e6, "bpw": 8 * written["bytes"] / n_weights,
                    **_measure(Path(written["file"]), eval_windows, reference, perplexity_of),
                    "seconds": time.perf_counter() - started}
            mine["vs preset KLD"] = mine["kld_mean"] / row["kld_mean"] - 1.0
            rows.append(mine)
            print(mine, flush=True)
            table = result.table()[["candidate", "MiB", "held-out ppl", "held-out KLD", "chosen"]]
            print(table.to_string(), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--presets", default=",".join(PRESETS))
    parser.add_argument("--eval", default="8x512", help="evaluation windows x tokens")
    parser.add_argument("--calib", default="8x512", help="calibration windows x tokens (imatrix, optimizer)")
    parser.add_argument("--imatrix", default="off,on", help="off, on or both")
    parser.add_argument("--work", default="", help="keep files and the store (its damage scans) in this folder "
                        "instead of a temporary one: a rerun reuses the scans")
    args = parser.parse_args()
    from bench.common import report

    settings = [s.strip() == "on" for s in args.imatrix.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-llamacpp-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        for name in [m for m in args.models.split(",") if m]:
            (work / name).mkdir(parents=True, exist_ok=True)
            rows += bench_model(name, [p for p in args.presets.split(",") if p], _size(args.eval),
                                _size(args.calib), settings, work)
    report("llamacpp", rows, {"eval": args.eval, "calib": args.calib, "presets": args.presets,
                              "command": "python -m bench.llamacpp " + " ".join(
                                  f"--{k} {v}" for k, v in vars(args).items())})


if __name__ == "__main__":
    main()
