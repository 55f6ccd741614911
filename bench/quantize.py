"""Layer-wise mixed-precision quantization on the built-in model (docs/methods.md §4).

    python -m bench.quantize [--quick] [--eval-windows N] [--seqlen S] [--gptq-sweep]
                             [--group-size 128] [--zero-point integer|float]

(a) ``quantize_speed``: seconds to see a new allocation's perplexity, from
    scratch (quantize every layer [+ GPTQ calibration] + evaluate) versus
    from the per-layer cache (a new variant over cached codes + evaluate),
    for RTN and GPTQ.
(b) ``quantize_sweep``: perplexity against the fraction of layers at the low
    level (2 or 3 bits, high level 4 bits), layers ordered by LIM, ZD or a
    seeded random order.  RTN always; GPTQ too with ``--gptq-sweep`` (default
    outside quick mode).
"""

from __future__ import annotations

import argparse
import time

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.evaluation.perplexity import perplexity
from engine.quant.allocation import allocate_fraction, layer_order
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import (
    calibration_warning,
    clear_memory_cache,
    prepare_levels,
    quantize_model,
)


def _ppl(model, windows) -> tuple[float, object]:
    start = time.perf_counter()
    result = perplexity(model, windows)
    return time.perf_counter() - start, result


def speed_rows(loaded, specs, calibration, windows, orders) -> list[dict]:
    """Time to a new allocation's perplexity: scratch vs memory cache vs disk cache."""
    n = loaded.num_layers
    first = allocate_fraction(orders["LIM"], 4, 3, 0.5)
    second = allocate_fraction(orders["LIM"], 4, 3, 0.25)
    third = allocate_fraction(orders["ZD"], 4, 2, 0.25)
    rows = []
    for spec in specs:
        calib = calibration if spec.method == "gptq" else None
        clear_memory_cache()
        scratch = quantize_model(loaded, first, calib, spec=spec, use_cache=False)
        eval_s, _ = _ppl(scratch.model, windows)
        base = scratch.stats.seconds + eval_s
        rows.append({"method": spec.method, "path": "scratch", "quantize_s": scratch.stats.seconds,
                     "eval_s": eval_s, "total_s": base, "quantize_speedup": 1.0, "total_speedup": 1.0})
        prepared = prepare_levels(loaded, spec, [2, 3, 4], calib)
        rows.append({"method": spec.method, "path": f"fill cache (3 levels × {n} layers)",
                     "quantize_s": prepared.seconds, "eval_s": 0.0, "total_s": prepared.seconds,
                     "quantize_speedup": None, "total_speedup": None})
        for label, alloc, clear in (("memory cache", second, False), ("disk cache", third, True)):
            if clear:
                clear_memory_cache()
            qm = quantize_model(loaded, alloc, calib, spec=spec)
            eval_s, _ = _ppl(qm.model, windows)
            rows.append({"method": spec.method, "path": label, "quantize_s": qm.stats.seconds, "eval_s": eval_s,
                         "total_s": qm.stats.seconds + eval_s,
                         "quantize_speedup": scratch.stats.seconds / qm.stats.seconds,
                         "total_speedup": base / (qm.stats.seconds + eval_s)})
    return rows


def sweep_rows(loaded, spec, calibration, windows, orders, fractions, dense_ppl) -> list[dict]:
    """Perplexity for every (ordering, low bits, fraction at the low level); duplicates evaluated once."""
    rows, seen = [], {}
    calib = calibration if spec.method == "gptq" else None
    for low in (3, 2):
        for name, order in orders.items():
            for fraction in fractions:
                alloc = allocate_fraction(order, 4, low, fraction)
                if alloc.bits not in seen:
                    qm = quantize_model(loaded, alloc, calib, spec=spec)
                    _, result = _ppl(qm.model, windows)
                    seen[alloc.bits] = (result, qm.size())
                result, size = seen[alloc.bits]
                rows.append({"method": spec.method, "ordering": name, "low_bits": low, "high_bits": 4,
                             "low_fraction": fraction, "avg_bits": alloc.average_bits,
                             "bits_per_weight": size.bits_per_weight, "ppl": result.ppl,
                             "ppl_vs_dense": result.ppl / dense_ppl, "ci_low": result.ci_low,
                             "ci_high": result.ci_high})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer windows and fractions, RTN sweep only")
    parser.add_argument("--eval-windows", type=int, default=None)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--gptq-sweep", action="store_true", help="also sweep with GPTQ (default without --quick)")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--zero-point", choices=["integer", "float"], default="integer",
                        help="float + group 32 reproduces the built-in's Q4_1 weights exactly at 4 bits")
    args = parser.parse_args()
    from engine.scores.outliers import weight_outliers
    from engine.scores.ranking import zd_importance
    from engine.scores.redundancy import layer_redundancy

    quick = args.quick
    eval_n = args.eval_windows or (4 if quick else 16)
    fractions = [0.0, 0.25, 0.5, 0.75, 1.0] if quick else [i / 10 for i in range(11)]
    loaded = load_model()
    arch = loaded.architecture
    windows = token_windows(DataSpec(split="evaluation", seqlen=args.seqlen, n_windows=eval_n), loaded.tokenizer)
    score_windows = token_windows(DataSpec(split="calibration", seqlen=args.seqlen, n_windows=8), loaded.tokenizer)
    gptq_windows = token_windows(DataSpec(split="calibration", seqlen=args.seqlen, n_windows=24 if quick else 32),
                                 loaded.tokenizer)
    start = time.perf_counter()
    lim = layer_redundancy(loaded.model, arch, score_windows).lim
    zd = zd_importance(weight_outliers(loaded.model, arch).zd_layer)
    score_s = time.perf_counter() - start
    n = loaded.num_layers
    orders = {"LIM": layer_order(n, "importance", lim), "ZD": layer_order(n, "importance", zd),
              "random": layer_order(n, "random", seed=0)}
    rtn = QuantizerSpec(method="rtn", group_size=args.group_size, zero_point=args.zero_point)
    gptq = QuantizerSpec(method="gptq", group_size=args.group_size, zero_point=args.zero_point)
    _, dense = _ppl(loaded.model, windows)
    meta = {"model": loaded.source, "layers": n, "eval": windows.label(), "score_calibration": score_windows.label(),
            "gptq_calibration": gptq_windows.label(), "rtn": rtn.label(), "gptq": gptq.label() + ", damp 0.01",
            "dense_ppl": round(dense.ppl, 4), "score_s": round(score_s, 1),
            "order_LIM_least_first": orders["LIM"], "order_ZD_least_first": orders["ZD"],
            "gptq_warning": calibration_warning(loaded, gptq_windows) or "none",
            "signals": "GPTQ calibrated on dense-model signals (layer results independent of allocation)"}
    suffix = "" if (args.group_size, args.zero_point) == (128, "integer") else f"_g{args.group_size}_{args.zero_point}"
    report("quantize_speed" + suffix, speed_rows(loaded, [rtn, gptq], gptq_windows, windows, orders), meta)
    specs = [rtn] + ([gptq] if args.gptq_sweep or not quick else [])
    rows = []
    for spec in specs:
        rows += sweep_rows(loaded, spec, gptq_windows, windows, orders, fractions, dense.ppl)
    report("quantize_sweep" + suffix, rows, meta)


if __name__ == "__main__":
    main()
