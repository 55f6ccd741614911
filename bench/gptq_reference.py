"""LayerLab's GPTQ against llm-compressor's on the same tokens (issue #19, docs/methods.md §10).

Runs in a separate virtual environment that has llm-compressor (it pins an
older transformers than the project, so it never goes into ``.venv``)::

    python3 -m venv .venv-ref
    .venv-ref/bin/pip install torch==2.13.0            # the local CPU wheel
    grep -v '^transformers' requirements.txt > /tmp/ref-req.txt
    .venv-ref/bin/pip install -c <(echo torch==2.13.0) -r /tmp/ref-req.txt llmcompressor==0.14.0.1 pytest
    .venv-ref/bin/python -m bench.gptq_reference [--bits 4 3] [--threads 1]

Everything but llm-compressor's own quantization goes through the engine:
the built-in model (``load_model``), the calibration windows (16 × 512 of the
wiki-offline *calibration* split, exactly those of ``bench.gptq``), the
evaluation windows (8 × 512 of its *evaluation* split) and ``perplexity``.
Rows per bit level, each quantized from scratch in this one process:

- ``rtn``: the engine's round-to-nearest (asymmetric, integer zeros, group 128);
- ``llm-compressor gptq``: ``GPTQModifier`` (int, asymmetric, strategy group,
  group 128, ``actorder="static"``, ``dampening_frac=0.01``, block 128,
  ``lm_head`` ignored) through ``oneshot`` with the ``sequential`` pipeline on
  the same windows (batch 1, no shuffling).  Its fake-quantized weights are
  copied into a plain copy of the dense model, which is then evaluated;
- ``layerlab gptq``: the engine's default GPTQ (sequential, "true sequential"
  inside a layer, static act-order, damping 0.01), as ``bench.gptq`` runs it;
- with ``--layerwise``, ``layerlab gptq, reference's in-layer propagation``:
  the engine's kernel with llm-compressor's order inside a layer (see
  :func:`layerwise_propagation`), which isolates that one design difference.

``quantize_s`` is the wall time of the quantization call (deep copy and
calibration forwards included; llm-compressor's also includes its tracing).
``codes_equal_layer0_qkv``: fraction of layer 0's q/k/v weights on the same
grid point as llm-compressor's (both see exactly the embedding outputs
there); ``codes_equal_all``: the same over every linear.  The meta holds a
kernel check on layer 0's q/k/v: the same Hessian through LayerLab's kernel
and llm-compressor's ``quantize_weight``, with their grid and with ours.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from contextlib import contextmanager, nullcontext

import torch

import engine.quant.gptq_pipeline as pipeline
from bench.common import report
from engine.core.data import DataSpec, token_windows
from engine.core.models import load_model
from engine.evaluation.perplexity import perplexity
from engine.quant.grid import QuantizerSpec
from engine.quant.quantize_model import quantize_model

os.environ.setdefault("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")  # else one INFO and two METRIC lines per linear
os.environ.setdefault("TQDM_DISABLE", "1")

GROUP = 128
DAMP = 0.01


def _ragged_groups() -> None:
    """Let llm-compressor's weight observer take a last group shorter than ``group_size``.

    llm-compressor 0.14 refuses 576 inputs with group 128 (its divisibility
    check; with ``bypass_divisibility_checks`` its observer then fails in
    ``unflatten``).  The built-in model's 576-wide linears therefore get their
    last group padded by repeating its last column, which leaves that group's
    min and max (hence scale and zero) those of its 64 real columns, as in
    LayerLab's grid.  The GPTQ kernel itself (``quantize_weight``) already
    indexes groups by ``column // group_size`` and needs no change.
    """
    from compressed_tensors.quantization import QuantizationStrategy
    from llmcompressor.observers import helpers

    original = helpers._flatten_weight
    if getattr(original, "ragged", False):
        return

    def flatten(value, args):
        if args.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP):
            short = -value.shape[-1] % args.group_size
            if short:
                value = torch.cat([value, value[..., -1:].expand(*value.shape[:-1], short)], dim=-1)
        return original(value, args)

    flatten.ragged = True
    helpers._flatten_weight = flatten


def llm_compressor_gptq(model: torch.nn.Module, tokenizer, calibration, bits: int, actorder: str | None = "static"):
    """Run llm-compressor's GPTQ on ``model`` (in place) over exactly ``calibration``'s windows."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    _ragged_groups()
    weights = {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group", "group_size": GROUP}
    recipe = GPTQModifier(targets="Linear", ignore=["lm_head"], dampening_frac=DAMP, actorder=actorder,
                          block_size=128, bypass_divisibility_checks=True,  # 576 inputs: last group of 64
                          config_groups={"group": {"targets": ["Linear"], "weights": weights}})
    ids = calibration.input_ids
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=dataset, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], pipeline="sequential", shuffle_calibration_samples=False,
            batch_size=1)
    return model


@contextmanager
def layerwise_propagation():
    """LayerLab's GPTQ with llm-compressor's propagation inside a layer (a diagnosis, not an engine mode).

    llm-compressor's sequential pipeline calibrates all linears of a decoder
    layer in one pass over the layer's *dense* weights (q/k/v, o, gate/up and
    down each see the outputs of the dense linears before them), quantizes
    them, then runs the quantized layer to feed the next one.  LayerLab's
    default is "true sequential" inside the layer too (o sees the quantized
    q/k/v, ...).  This swaps the engine's per-layer step for the reference's,
    built from the engine's own pieces, so both orders run the same kernel.
    """
    original = pipeline.gptq_layer_sequential

    def layer_step(layer, index, arch, spec, bits, signals, inputs):
        dense_inputs = list(signals)
        weights = pipeline.gptq_layer_dense(layer, index, arch, spec, [bits], signals, inputs)[bits]
        signals[:] = dense_inputs
        pipeline.write_weights(arch.layer_linears(layer), weights)
        pipeline.run_layer(layer, index, signals, inputs)  # the quantized layer feeds the next one
        return weights

    pipeline.gptq_layer_sequential = layer_step
    try:
        yield
    finally:
        pipeline.gptq_layer_sequential = original


def plain_copy(dense: torch.nn.Module, quantized: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``dense`` holding ``quantized``'s parameters (no quantization wrappers or hooks)."""
    clean = copy.deepcopy(dense)
    with torch.no_grad():
        for name, param in clean.named_parameters():
            param.copy_(quantized.get_parameter(name))
    return clean


def _codes_equal(loaded, ours, theirs, layers: list[int], names: tuple[str, ...] | None) -> float:
    """Fraction of weights of ``layers``' linears (``names``: all) on the same grid point in both models."""
    arch = loaded.architecture
    same = total = 0
    for i in layers:
        mine = arch.layer_linears(arch.decoder_layers(ours)[i])
        other = arch.layer_linears(arch.decoder_layers(theirs)[i])
        for name in names or tuple(mine):
            scale = other[name].weight_scale.detach()[:, torch.arange(mine[name].weight.shape[1]) // GROUP]
            gap = (mine[name].weight.detach() - other[name].weight.detach()).abs()
            same += int((gap < 0.5 * scale).sum())
            total += gap.numel()
    return same / total


@torch.no_grad()
def layer0_kernel_check(loaded, calibration, bits: int) -> dict:
    """Layer 0's q/k/v (identical inputs in both): LayerLab's kernel against llm-compressor's ``quantize_weight``.

    Same Hessian (LayerLab's, of the 16 calibration windows) into both; their
    kernel once with their own grid (fp32 min-max scales) and once with ours
    (fp16 scales rounded up).  Returns the fraction of weights on the same
    grid point as LayerLab's and the output errors ``||(W - Q) Xᵀ||`` summed
    over q/k/v, relative to LayerLab's.
    """
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    from engine.quant.gptq import HessianAccumulator, gptq_quantize_shared
    from engine.quant.grid import rtn_quantize

    arch = loaded.architecture
    linears = arch.layer_linears(arch.decoder_layers(loaded.model)[0])
    inputs, acc = [], HessianAccumulator(linears["q"].in_features)

    def hook(_module, args):
        acc.add(args[0])
        inputs.append(args[0].reshape(-1, args[0].shape[-1]).float())

    handle = linears["q"].register_forward_pre_hook(hook)
    try:
        for window in calibration.input_ids:
            loaded.model.model(input_ids=window[None])  # the decoder stack is enough
    finally:
        handle.remove()
    x, hessian = torch.cat(inputs), acc.hessian()
    spec = QuantizerSpec(method="gptq", bits=bits, group_size=GROUP, act_order=True, damp=DAMP)
    weights = [linears[name].weight.float() for name in ("q", "k", "v")]
    ours = [q.dequantize() for q in gptq_quantize_shared(weights, hessian, [spec] * 3)]
    qargs = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=GROUP,
                             actorder="static")
    offset, maxq = 2 ** (bits - 1), 2**bits - 1
    out = {}
    for label in ("their grid", "our grid"):
        same = total = 0
        error = {"ours": 0.0, "theirs": 0.0}
        for weight, mine in zip(weights, ours):
            columns = torch.arange(weight.shape[1]) // GROUP
            rtn = rtn_quantize(weight, spec)
            if label == "our grid":
                scale, zero = rtn.scales.float(), rtn.zeros.float() - offset
            else:  # compressed-tensors' min-max qparams, per group (the last one 64 wide)
                groups = [weight[:, columns == g] for g in range(int(columns.max()) + 1)]
                low = torch.stack([g.amin(1) for g in groups], 1).clamp(max=0)
                high = torch.stack([g.amax(1) for g in groups], 1).clamp(min=0)
                scale = (high - low) / maxq
                zero = torch.clamp(torch.round(-offset - low / scale), -offset, offset - 1)
            theirs = quantize_weight(weight[None].clone(), hessian.float()[None], scale[None], zero[None], None, qargs,
                                     blocksize=128, percdamp=DAMP)[0][0]
            same += int(((theirs - mine).abs() < 0.5 * rtn.scales.float()[:, columns]).sum())
            total += weight.numel()
            error["ours"] += float(((weight - mine) @ x.t()).norm() ** 2)
            error["theirs"] += float(((weight - theirs) @ x.t()).norm() ** 2)
        out[f"{bits}-bit, {label}: same grid point"] = round(same / total, 5)
        out[f"{bits}-bit, {label}: their output error / ours"] = round((error["theirs"] / error["ours"]) ** 0.5, 5)
    return out


def _ratios(level: list[dict], dense: float) -> list[dict]:
    """Add perplexity over RTN's (the level's first row) and over dense to each row (same columns in all)."""
    columns = {key: "-" for r in level for key in r}
    for r in level:
        r.update({key: value for key, value in columns.items() if key not in r})
        r["ppl_vs_rtn"] = r["ppl"] / level[0]["ppl"]
        r["ppl_vs_dense"] = r["ppl"] / dense
    return level


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--calibration-windows", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--skip-layerlab", action="store_true", help="no LayerLab GPTQ with its default settings")
    parser.add_argument("--skip-reference", action="store_true", help="only the engine's rows (no llm-compressor)")
    parser.add_argument("--layerwise", action="store_true",
                        help="also LayerLab's GPTQ with llm-compressor's in-layer propagation (diagnosis)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import llmcompressor
    import transformers

    loaded = load_model()
    calibration = token_windows(DataSpec("wiki-offline", "calibration", args.seqlen, args.calibration_windows),
                                loaded.tokenizer)
    evaluation = token_windows(DataSpec("wiki-offline", "evaluation", args.seqlen, args.eval_windows),
                               loaded.tokenizer)
    dense = perplexity(loaded.model, evaluation).ppl
    rows, kernel = [], {}
    for bits in args.bits:
        if not args.skip_reference:
            kernel.update(layer0_kernel_check(loaded, calibration, bits))
        level = []

        def row(variant: str, model, seconds: float, **extra) -> dict:
            result = perplexity(model, evaluation)
            out = {"bits": bits, "variant": variant, "ppl": result.ppl, "ci_low": result.ci_low,
                   "ci_high": result.ci_high, "quantize_s": seconds, **extra}
            level.append(out)
            print(f"  {bits}-bit {variant}: ppl {result.ppl:.3f} ({seconds:.1f} s)", flush=True)
            return out

        start = time.perf_counter()
        rtn = quantize_model(loaded, [bits] * loaded.num_layers, spec=QuantizerSpec(bits=bits, group_size=GROUP),
                             use_cache=False)
        row("rtn", rtn.model, time.perf_counter() - start)
        del rtn
        theirs = None
        if not args.skip_reference:
            start = time.perf_counter()
            theirs = llm_compressor_gptq(copy.deepcopy(loaded.model), loaded.tokenizer, calibration, bits)
            row("llm-compressor gptq", plain_copy(loaded.model, theirs), time.perf_counter() - start)

        def same_codes(model) -> dict:
            """Fractions of weights on the same grid point as llm-compressor's (layer 0's q/k/v; everything)."""
            if theirs is None:
                return {}
            return {"codes_equal_layer0_qkv": _codes_equal(loaded, model, theirs, [0], ("q", "k", "v")),
                    "codes_equal_all": _codes_equal(loaded, model, theirs, list(range(loaded.num_layers)), None)}

        spec = QuantizerSpec(method="gptq", bits=bits, group_size=GROUP, act_order=True, damp=DAMP)
        variants = {} if args.skip_layerlab else {"layerlab gptq": None}
        if args.layerwise:
            variants["layerlab gptq, reference's in-layer propagation"] = layerwise_propagation
        for name, context in variants.items():
            start = time.perf_counter()
            with context() if context else nullcontext():
                ours = quantize_model(loaded, [bits] * loaded.num_layers, calibration, spec=spec, use_cache=False)
            row(name, ours.model, time.perf_counter() - start, **same_codes(ours.model))
            del ours
        theirs = None
        rows += _ratios(level, dense)
    meta = {"model": loaded.source, "layers": loaded.num_layers, "calibration": calibration.label(),
            "evaluation": evaluation.label(), "dense_ppl": round(dense, 4), "threads": torch.get_num_threads(),
            "grid": f"asymmetric, integer zero points, group {GROUP}, damping {DAMP}",
            "reference": f"llmcompressor {llmcompressor.__version__} GPTQModifier, actorder static, sequential "
                         "pipeline", "torch": torch.__version__, "transformers": transformers.__version__,
            "layer 0 q/k/v kernel check (same Hessian, llm-compressor's quantize_weight)": kernel}
    suffix = "" if args.eval_windows == 8 else f"_eval{args.eval_windows}"
    report("gptq_reference" + suffix, rows, meta)


if __name__ == "__main__":
    main()
