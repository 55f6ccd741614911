"""GPTQ against RTN on the built-in model, next to the llm-compressor reference (docs/methods.md §10).

    python -m bench.gptq [--bits 4 3] [--eval-windows 8] [--threads N] [--extra]

Setup of docs/methods.md §10: every layer at the same level, asymmetric integer grid,
group 128, damping 0.01, calibration 16 × 512 tokens of the wiki-offline
*calibration* split, perplexity on 8 × 512 tokens of its *evaluation* split.
Rows per bit level: RTN; GPTQ (sequential propagation, static act-order: the
default); GPTQ without act-order; GPTQ calibrated on dense signals
(``propagation="dense"``, the what-if mode); with ``--extra`` also dynamic
act-order groups (``g_idx``) and GPTQ without act-order with ``v_proj`` put
back to RTN (the docs/methods.md §10 diagnosis).  ``quantize_s`` is the wall time to
quantize all 30 layers from scratch (no cache; deep copy and calibration
capture included).  ``ref_*`` columns are *quoted from docs/methods.md §10*
(llm-compressor 0.14 on CPU, its own run; 8 or 64 evaluation windows), not
measured here: compare ratios to RTN and to dense, since the dense
perplexity of this checkout's evaluation windows differs from the one quoted
there (``dense_ppl`` against ``reference_dense_ppl`` in the meta).  At 4 bits
the result moves by about 0.5 ppl with the thread count alone (float
summation order), at 3 bits by several: compare like with like.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.evaluation.perplexity import perplexity
from engine.quant.grid import QuantizerSpec, rtn_quantize
from engine.quant.quantize_model import quantize_model

# docs/methods.md §10, quoted: per number of evaluation windows of 512 tokens (8: the table; 64: its brackets)
REFERENCES = {
    8: {"dense": 22.89, (4, "rtn"): "28.88", (4, "gptq"): "27.64-28.17", (4, "gptq no act-order"): "30.48-31.26",
        (3, "rtn"): "101.3", (3, "gptq"): "52.8"},
    64: {"dense": 20.68, (4, "rtn"): "27.07", (4, "gptq"): "26.10", (4, "gptq no act-order"): "29.06"},
}
GPTQ = QuantizerSpec(method="gptq", group_size=128, act_order=True)  # sequential, static groups
VARIANTS = {
    "rtn": QuantizerSpec(method="rtn", group_size=128),
    "gptq": GPTQ,
    "gptq no act-order": replace(GPTQ, act_order=False),
    "gptq dense signals": replace(GPTQ, propagation="dense"),
}
EXTRA = {
    "gptq dynamic groups (g_idx)": replace(GPTQ, group_params="dynamic"),
    "gptq no act-order, v_proj RTN": replace(GPTQ, act_order=False),
}


def _v_proj_to_rtn(loaded, qm) -> None:
    """Put RTN weights (of the base model's dense ``v_proj``, only read) into the quantized copy's ``v_proj``."""
    arch = loaded.architecture
    with torch.no_grad():
        for base, layer, bits in zip(arch.decoder_layers(loaded.model), arch.decoder_layers(qm.model), qm.bits):
            dense, target = arch.layer_linears(base)["v"], arch.layer_linears(layer)["v"]
            rtn = rtn_quantize(dense.weight, QuantizerSpec(bits=bits, group_size=qm.spec.group_size))
            target.weight.copy_(rtn.dequantize(target.weight.dtype))


def run_variant(loaded, name: str, spec: QuantizerSpec, bits: int, calibration, evaluation,
                reference: dict) -> dict:
    """Quantize every layer at ``bits`` from scratch, then evaluate; ``reference``: the quoted numbers."""
    layer_spec = spec.with_bits(bits)
    start = time.perf_counter()
    qm = quantize_model(loaded, [bits] * loaded.num_layers, calibration if spec.method == "gptq" else None,
                        spec=layer_spec, use_cache=False)
    seconds = time.perf_counter() - start
    if name.endswith("v_proj RTN"):
        _v_proj_to_rtn(loaded, qm)
    result = perplexity(qm.model, evaluation)
    return {"bits": bits, "variant": name, "label": layer_spec.label(), "ppl": result.ppl,
            "ci_low": result.ci_low, "ci_high": result.ci_high, "quantize_s": seconds,
            "ref_ppl (docs/methods.md §10, quoted)": reference.get((bits, name), "-"),
            "ref_vs_rtn (quoted)": _quoted_ratio(reference, (bits, name), (bits, "rtn")),
            "ref_vs_dense (quoted)": _quoted_ratio(reference, (bits, name), "dense")}


def _quoted_ratio(reference: dict, key, over) -> str:
    """Quoted perplexity ``key`` over quoted ``over`` (a range stays a range), or ``-``."""
    quoted, base = reference.get(key), reference.get(over)
    if quoted is None or base is None:
        return "-"
    return "-".join(f"{float(v) / float(base):.3f}" for v in quoted.split("-"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--eval-windows", type=int, default=8, help="docs/methods.md §10 quotes 8, and 64 at 4 bits")
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--extra", action="store_true", help="also dynamic groups and the v_proj diagnosis")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model()
    calibration = token_windows(DataSpec("wiki-offline", "calibration", args.seqlen, args.calibration_windows),
                                loaded.tokenizer)
    evaluation = token_windows(DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows),
                               loaded.tokenizer)
    dense = perplexity(loaded.model, evaluation).ppl
    variants = {**VARIANTS, **(EXTRA if args.extra else {})}
    reference = REFERENCES.get(args.eval_windows, {}) if args.seqlen == 512 else {}
    rows = []
    for bits in args.bits:
        level = [run_variant(loaded, name, spec, bits, calibration, evaluation, reference)
                 for name, spec in variants.items()]
        rtn = next(row for row in level if row["variant"] == "rtn")
        for row in level:
            row["ppl_vs_rtn"] = row["ppl"] / rtn["ppl"]
            row["ppl_vs_dense"] = row["ppl"] / dense
        rows += level
    meta = {"model": loaded.source, "layers": loaded.num_layers, "calibration": calibration.label(),
            "evaluation": evaluation.label(), "dense_ppl": round(dense, 4),
            "reference_dense_ppl (docs/methods.md §10, quoted)": reference.get("dense", "-"),
            "threads": torch.get_num_threads(),
            "grid": "asymmetric, integer zero points, group 128, damping 0.01"}
    suffix = "" if args.eval_windows == 8 else f"_eval{args.eval_windows}"
    report("gptq" + suffix, rows, meta)


if __name__ == "__main__":
    main()
