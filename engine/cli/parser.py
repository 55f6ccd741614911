"""The CLI's arguments: one sub-command per workflow, with the options each one takes (``build_parser``)."""

from __future__ import annotations

import argparse

from engine.core.builtins import BUILTIN_NAME, BUILTINS
from engine.core.data import SOURCES
from engine.dropping.choose import RANKINGS
from engine.optimize.bit_budget import DEFAULT_LEVELS, GRANULARITIES
from engine.quant.ggml_types import OUTPUT_TYPES, TYPE_SETS
from engine.quant.grid import METHODS, ZERO_POINTS
from engine.quant.runtimes import DEFAULT_RUNTIME, RUNTIMES
from engine.runs.bits_optimizer import DEFAULT_CANDIDATES, DEFAULT_HELD_OUT
from engine.runs.plans import (
    DEFAULT_CALIB_SEQLEN,
    DEFAULT_CALIB_WINDOWS,
    DEFAULT_EVAL_SEQLEN,
    DEFAULT_EVAL_WINDOWS,
    ORDERINGS,
    SCHEDULES,
)
from engine.sensitivity.actions import parse_actions
from engine.sensitivity.errors import ActionSpecError

GROUP_SIZE_HELP = ("weights per scale (default: 128, or the largest below it that the --runtime's compressed-tensors "
                   "checkpoint holds for this model's row widths, e.g. 64 for SmolLM2's 576; 0: one scale per row)")


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _actions(text: str) -> list:
    try:
        return parse_actions(text)
    except ActionSpecError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _common(parser: argparse.ArgumentParser, calibration: bool = True, evaluation: bool = True) -> None:
    parser.add_argument("--model", default=BUILTIN_NAME,
                        help=f"hub id, local folder, or a built-in name ({', '.join(BUILTINS)})")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--device-map", default=None, help="'auto' spreads a large model over all GPUs (accelerate)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--trust-remote-code", action="store_true", help="run code from the model repository")
    parser.add_argument("--store", default=None, help="results database (default: cache/results.sqlite)")
    parser.add_argument("--data", default="wiki-offline", choices=SOURCES)
    parser.add_argument("--text-file", default=None, help="text file for --data file")
    if calibration:
        parser.add_argument("--calib-windows", type=int, default=DEFAULT_CALIB_WINDOWS)
        parser.add_argument("--calib-seqlen", type=int, default=DEFAULT_CALIB_SEQLEN)
    if evaluation:
        parser.add_argument("--eval-windows", type=int, default=DEFAULT_EVAL_WINDOWS)
        parser.add_argument("--eval-seqlen", type=int, default=DEFAULT_EVAL_SEQLEN)
        parser.add_argument("--tasks", default="", help="comma-separated lm-eval tasks (zero-shot)")
        parser.add_argument("--limit", type=int, default=None, help="items per zero-shot task")


def _slicing_options(parser: argparse.ArgumentParser, sweep: bool) -> None:
    if sweep:
        parser.add_argument("--targets", type=_floats, default=[0.1, 0.2, 0.3], help="e.g. 0,0.1,0.2,0.3")
        parser.add_argument("--bases", type=_floats, default=[0.0, 0.1], help="dynamic slicing bases")
        parser.add_argument("--schedules", default="constant,dynamic")
    else:
        parser.add_argument("--schedule", choices=SCHEDULES, default="dynamic")
        parser.add_argument("--target", type=float, default=0.25, help="average slicing fraction SP")
        parser.add_argument("--basis", type=float, default=0.10, help="slicing basis SB (dynamic)")
        parser.add_argument("--fractions", type=_floats, default=[], help="custom per-layer fractions")
        parser.add_argument("--save", default=None, help="folder to save the sliced model")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--final-rotation", action="store_true")


def _llamacpp_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ggml-types", choices=list(TYPE_SETS), default="k-quants",
                        help="--quantizer llama.cpp: which llama.cpp types the levels mean (k-quants: 2->Q2_K ... "
                        "6->Q6_K, 8->Q8_0; legacy: 4->Q4_0, 5->Q5_0, 8->Q8_0; legacy+min: Q4_1, Q5_1, Q8_0)")
    parser.add_argument("--imatrix", action="store_true",
                        help="--quantizer llama.cpp: weight rounding errors by the calibration windows' importance "
                        "matrix, as llama-quantize --imatrix does")
    parser.add_argument("--output-type", choices=list(OUTPUT_TYPES), default="auto",
                        help="--quantizer llama.cpp: type of the embedding/output matrix (auto: llama.cpp's rule)")


def _runtime_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=list(RUNTIMES), default=DEFAULT_RUNTIME,
                        help="where the model will run: " + "; ".join(r.summary() for r in RUNTIMES.values())
                        + " A choice the runtime does not run is refused with what it does run.")


def _quant_options(parser: argparse.ArgumentParser, sweep: bool) -> None:
    _runtime_option(parser)
    parser.add_argument("--quantizer", choices=list(METHODS), default="rtn",
                        help="rtn / gptq: LayerLab's research grid; llama.cpp: llama.cpp's own types and quantizer "
                        "(the run is the GGUF file it exports)")
    _llamacpp_options(parser)
    parser.add_argument("--group-size", type=int, default=None, help=GROUP_SIZE_HELP)
    parser.add_argument("--zero-point", choices=list(ZERO_POINTS), default=None,
                        help="integer (GPTQ's asymmetric grid; exports exactly as compressed-tensors with zero "
                        "points, which vLLM runs at 4 bits), float (GGUF Q4_1's scale + minimum) or symmetric (no zero "
                        "stored; exports exactly as compressed-tensors and GGUF Q4_0 / Q5_0 / Q8_0). Not given: the "
                        "target runtime's default (integer; transformers: symmetric)")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: process columns by decreasing activation")
    parser.add_argument("--high-bits", type=int, default=4)
    if sweep:
        parser.add_argument("--low-bits", type=_ints, default=[2, 3])
        parser.add_argument("--low-fractions", type=_floats, default=[0.0, 0.25, 0.5, 0.75, 1.0])
        parser.add_argument("--orderings", default="lim,zd,random")
    else:
        parser.add_argument("--low-bits", type=int, default=2)
        parser.add_argument("--low-fraction", type=float, default=0.25)
        parser.add_argument("--target-bits", type=float, default=None, help="average bits instead of a fraction")
        parser.add_argument("--ordering", choices=ORDERINGS, default="lim")
        parser.add_argument("--custom-order", type=_ints, default=[], help="layers, least important first")
        parser.add_argument("--save", default=None, help="folder to save the quantized model")
    parser.add_argument("--seed", type=int, default=0)


def _drop_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", choices=["layer", "attention", "mlp"], default="layer",
                        help="what of each layer goes")
    parser.add_argument("--count", type=int, default=4, help="how many layers / blocks to drop")
    parser.add_argument("--by", choices=list(RANKINGS), default="lr",
                        help="ranking: a score, the measured KL of dropping each block alone (sensitivity), or "
                        "--layers")
    parser.add_argument("--iterative", action="store_true",
                        help="drop one at a time, re-ranking the rest on the smaller model (count rankings)")
    parser.add_argument("--layers", type=_ints, default=[], help="the layers to drop with --by custom")
    parser.add_argument("--no-protect", action="store_true", help="allow dropping the first and last layer")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="LR and ZD layer scores (cached)")
    _common(score, evaluation=False)
    score.add_argument("--k", type=float, default=3.0, help="outlier threshold |z| > k")
    _common(commands.add_parser("evaluate", help="perplexity and zero-shot accuracy of the dense model"),
            calibration=False)
    for name, sweep in (("slice", False), ("sweep-slicing", True)):
        sub = commands.add_parser(name, help="SliceGPT (constant / LR-dynamic)" + (" grid" if sweep else ""))
        _common(sub)
        _slicing_options(sub, sweep)
    for name, sweep in (("quantize", False), ("sweep-quantization", True)):
        sub = commands.add_parser(name, help="layer-wise mixed-precision quantization" + (" grid" if sweep else ""))
        _common(sub)
        _quant_options(sub, sweep)
    drop = commands.add_parser("drop", help="drop decoder layers, or attention / MLP blocks (ShortGPT, LLM-Drop)")
    _common(drop)
    _drop_options(drop)
    drop.add_argument("--save", default=None, help="folder to save the dropped model")
    stack = commands.add_parser("stack", help="slice or drop, then quantize the result")
    _common(stack)
    first = stack.add_mutually_exclusive_group(required=True)
    first.add_argument("--slice", type=float, help="constant slicing fraction SP of the first stage")
    first.add_argument("--drop-layers", type=int, help="whole layers (ranked by LR) dropped in the first stage")
    stack.add_argument("--quantize-bits", type=int, default=4, help="bits of the second stage")
    stack.add_argument("--group-size", type=int, default=None, help=GROUP_SIZE_HELP)
    stack.add_argument("--quantizer", choices=list(METHODS), default="rtn",
                       help="the second stage's quantizer; after --drop-layers, llama.cpp's types export as a GGUF "
                       "file (export RUN_ID --format gguf), --runtime vllm or transformers as a compressed-tensors "
                       "folder (--format ct)")
    _runtime_option(stack)
    _llamacpp_options(stack)
    sweep = commands.add_parser("sweep-methods", help="every method at matched sizes (fractions of dense bytes)")
    _common(sweep)
    sweep.add_argument("--sizes", default="0.9,0.75,0.6,0.5", help="fractions of the dense model's 16-bit bytes")
    sweep.add_argument("--quantizer", choices=["rtn", "gptq"], default="rtn")
    sweep.add_argument("--json", default=None, help="write every run and the verdict here")
    sensitivity = commands.add_parser("sensitivity", help="measured per-layer damage of actions, and how well "
                                      "LR / LIM / ZD predict it (cached)")
    _common(sensitivity, evaluation=False)
    sensitivity.add_argument("--actions", type=_actions, default="quant:3,slice:0.25,drop",
                             help="comma-separated: quant:3 (RTN), gptq:3, quant:3/g64, quant:3@down (one linear "
                             "of each layer), quant:Q3_K (llama.cpp's type), slice:0.25, drop, drop-attn, drop-mlp")
    sensitivity.add_argument("--k", type=float, default=3.0, help="outlier threshold |z| > k")
    sensitivity.add_argument("--batch-size", type=int, default=4, help="calibration windows per forward")
    sensitivity.add_argument("--json", default=None, help="write the per-layer matrix and the agreement table here")
    bits = commands.add_parser("optimize-bits", help="bits per layer (or per linear) under a size budget, from "
                               "measured damage; checked on held-out calibration windows, then evaluated")
    _common(bits)
    budget = bits.add_mutually_exclusive_group(required=True)
    budget.add_argument("--avg-bits", type=float, help="honest bits per quantized weight (scales and zeros included)")
    budget.add_argument("--bytes", type=float, help="whole-model bytes (unquantized parts at 16 bits; with "
                        "--quantizer llama.cpp: the GGUF file's bytes)")
    bits.add_argument("--levels", type=_ints, default=list(DEFAULT_LEVELS), help="allowed levels, e.g. 2,3,4,8")
    bits.add_argument("--quantizer", choices=list(METHODS), default="rtn")
    _runtime_option(bits)
    bits.add_argument("--group-size", type=int, default=None, help=GROUP_SIZE_HELP)
    bits.add_argument("--candidates", type=int, default=DEFAULT_CANDIDATES,
                      help="solver candidates checked on held-out windows")
    bits.add_argument("--held-out", type=int, default=DEFAULT_HELD_OUT,
                      help="calibration windows after --calib-windows used to check candidates")
    bits.add_argument("--granularity", choices=GRANULARITIES, default="layer",
                      help="a level per layer, or per linear of each layer (q, k, v, o, gate, up, down: one damage "
                      "scan per linear and level)")
    bits.add_argument("--json", default=None, help="write the candidates, the choice and its evaluation here")
    slicing = commands.add_parser("optimize-slicing", help="the best slicing schedule for a target: SB predicted "
                                  "from measured per-layer damage, a measured schedule, checked on held-out "
                                  "calibration windows, then evaluated")
    _common(slicing)
    slicing.add_argument("--target", type=float, default=0.25, help="average share of residual dims to remove")
    slicing.add_argument("--fractions", type=_floats, default=[0.1, 0.2, 0.3, 0.4],
                         help="per-layer slicing fractions to measure")
    slicing.add_argument("--round-to", type=int, default=8)
    slicing.add_argument("--sb-checks", type=int, default=1,
                         help="best predicted SB values sliced and checked (SB = 0 and the measured schedule "
                              "always are)")
    slicing.add_argument("--held-out", type=int, default=DEFAULT_HELD_OUT,
                         help="calibration windows after --calib-windows used to check candidates")
    slicing.add_argument("--json", default=None, help="write the candidates, the choice and its evaluation here")
    export = commands.add_parser("export", help="write a stored run's model as a Hugging Face folder (dropped, "
                                 "sliced), a mixed-bit GGUF file or a compressed-tensors folder (quantized), "
                                 "then verify it by reloading")
    export.add_argument("run_id", type=int,
                        help="the run id (every command prints it as \"run\"; the Results page lists them)")
    export.add_argument("--format", choices=["hf", "gguf", "ct"], required=True,
                        help="hf: Hugging Face folder; gguf: GGUF file; ct: compressed-tensors folder (runs "
                        "quantized with --zero-point integer or symmetric)")
    export.add_argument("--out", required=True, help="folder to write (refused if it exists and is not empty)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    export.add_argument("--dtype-out", default=None, choices=["float16", "bfloat16", "float32"],
                        help="weights of a Hugging Face folder, or the unquantized tensors of a compressed-tensors "
                        "folder (default: the model's own)")
    export.add_argument("--gguf-types", default="exact", choices=["exact", "compact"],
                        help="exact: types that hold LayerLab's codes as they are; compact: nearest k-quants "
                        "(smaller, re-quantized)")
    export.add_argument("--verify-windows", type=int, default=4, help="evaluation windows of the round-trip check")
    export.add_argument("--model", default=None, help="default: the run's own model")
    export.add_argument("--device", default="auto")
    export.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    export.add_argument("--trust-remote-code", action="store_true")
    export.add_argument("--store", default=None, help="results database (default: cache/results.sqlite)")
    return parser
