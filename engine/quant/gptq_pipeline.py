"""GPTQ's layer-by-layer wiring: calibration signals through the decoder layers, Hessians from pre-hooks.

The pure algorithm is :mod:`engine.quant.gptq` (one weight, one Hessian);
this module feeds it.  :func:`engine.core.capture.capture_layer_inputs`
records the first layer's input and every layer's keyword arguments (masks,
rotary tables) on a *work copy* of the model; then, layer by layer, forward
pre-hooks on the first linear of each group that reads one input
(:func:`linear_stages`) accumulate ``H = 2/n Σ x xᵀ``.

Two propagations (``QuantizerSpec.propagation``), two drivers:

- :func:`gptq_dense_signals`: every linear calibrated on the dense model's
  signals; one (layer, bits) result does not depend on the other layers.
- :func:`gptq_sequential`: layer ``i`` calibrated on the outputs of the
  already quantized layers ``0..i-1``, and inside a layer each group on the
  outputs of the quantized groups before it ("true sequential").  One batch:
  each group is quantized in its pre-hook, just before it runs (one forward
  per layer); several batches: one pass per group, stopped at that group.

Everything here hooks and overwrites the work copy only (never the base).
Caching and variants live in :mod:`engine.quant.quantize_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from engine.core.architectures import Architecture
from engine.core.capture import LayerInputs, capture_layer_inputs
from engine.core.data import TokenWindows
from engine.core.models import LoadedModel
from engine.core.progress import ProgressFn
from engine.quant.cache import LayerWeights
from engine.quant.gptq import HessianAccumulator, gptq_quantize_shared
from engine.quant.grid import QuantizerSpec
from engine.quant.layer_bits import LayerBits, linear_bits


def linear_stages(arch: Architecture) -> list[tuple[str, ...]]:
    """A layer's linears grouped by the input they read, in the order they run.

    Llama-like: ``[("q", "k", "v"), ("o",), ("gate", "up"), ("down",)]``;
    Phi-3: ``[("qkv",), ("o",), ("gate_up",), ("down",)]``.  The linears of
    one group share a Hessian and are quantized together.
    """
    stages: list[list[str]] = []
    for name, path in arch.linears.items():
        shared = next((group for group in (arch.attn_inputs, arch.mlp_inputs) if path in group), ())
        if stages and arch.linears[stages[-1][0]] in shared:
            stages[-1].append(name)
        else:
            stages.append([name])
    return [tuple(stage) for stage in stages]


def gptq_stage(linears: dict[str, nn.Linear], names: Sequence[str], hessian: torch.Tensor, spec: QuantizerSpec,
               levels: Sequence[int]) -> dict[int, LayerWeights]:
    """GPTQ of the linears ``names`` (one input, Hessian ``[in, in]``) at every level, in one column loop.

    Results on CPU: ``{bits: {name: weight}}``.
    """
    pairs = [(b, name) for b in levels for name in names]
    out: dict[int, LayerWeights] = {b: {} for b in levels}
    for (b, name), weight in zip(pairs, _gptq_pairs(linears, hessian, spec, pairs)):
        out[b][name] = weight
    return out


def _gptq_pairs(linears: dict[str, nn.Linear], hessian: torch.Tensor, spec: QuantizerSpec,
                pairs: Sequence[tuple[int, str]]) -> list:
    """GPTQ of each ``(bits, name)`` pair on one shared Hessian, in one column loop; results on CPU."""
    results = gptq_quantize_shared([linears[name].weight for _, name in pairs], hessian,
                                   [spec.with_bits(b) for b, _ in pairs])
    return [weight.to("cpu") for weight in results]


@torch.no_grad()
def write_weights(linears: dict[str, nn.Linear], weights: LayerWeights) -> None:
    """Set each named linear's weight to ``dequantize(stored)`` (in place, on a copy)."""
    for name, stored in weights.items():
        linear = linears[name]
        linear.weight.copy_(stored.to(linear.weight.device).dequantize(linear.weight.dtype))


@torch.no_grad()
def restore_dense(loaded: LoadedModel, model: nn.Module, layers: Iterable[int]) -> None:
    """Copy the dense weights of ``layers``' linears from ``loaded.model`` (only read) into the copy ``model``."""
    arch = loaded.architecture
    source, target = arch.decoder_layers(loaded.model), arch.decoder_layers(model)
    for i in layers:
        dense = arch.layer_linears(source[i])
        for name, linear in arch.layer_linears(target[i]).items():
            linear.weight.copy_(dense[name].weight)


class _StopLayer(Exception):
    """Raised by a hook once a layer pass has what it needs."""


@contextmanager
def _pre_hooks(hooks: dict[nn.Module, Callable[[torch.Tensor], None]]) -> Iterator[None]:
    """Call ``hooks[module](input)`` before each ``module`` runs; removed on exit."""
    def pre_hook(fn: Callable[[torch.Tensor], None]):
        def hook(_module: nn.Module, args: tuple) -> None:
            fn(args[0])  # returns nothing: the module runs on its own input
        return hook

    handles = [module.register_forward_pre_hook(pre_hook(fn)) for module, fn in hooks.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _output(result) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result


def run_layer(layer: nn.Module, index: int, signals: list[torch.Tensor], inputs: LayerInputs,
              keep: bool = True) -> None:
    """Run ``layer`` over every batch; with ``keep`` its outputs replace ``signals`` (the next layer's inputs)."""
    for b, hidden in enumerate(signals):
        try:
            out = _output(layer(hidden, **inputs.layer_kwargs[index][b]))
        except _StopLayer:
            continue
        if keep:
            signals[b] = out


def gptq_layer_dense(layer: nn.Module, index: int, arch: Architecture, spec: QuantizerSpec, levels: list[int],
                     signals: list[torch.Tensor], inputs: LayerInputs) -> dict[int, LayerWeights]:
    """GPTQ of one layer at each level on dense signals; ``signals`` move on to the dense layer's outputs."""
    linears = arch.layer_linears(layer)
    stages = linear_stages(arch)
    accumulators = {stage: HessianAccumulator(linears[stage[0]].in_features, linears[stage[0]].weight.device)
                    for stage in stages}
    with _pre_hooks({linears[stage[0]]: accumulators[stage].add for stage in stages}):
        run_layer(layer, index, signals, inputs)
    out: dict[int, LayerWeights] = {b: {} for b in levels}
    for stage in stages:
        for b, weights in gptq_stage(linears, stage, accumulators[stage].hessian(), spec, levels).items():
            out[b].update(weights)
    return out


def gptq_layer_sequential(layer: nn.Module, index: int, arch: Architecture, spec: QuantizerSpec, bits: LayerBits,
                          signals: list[torch.Tensor], inputs: LayerInputs) -> LayerWeights:
    """True-sequential GPTQ of one layer at ``bits`` (one level, or one per linear), in place; ``signals`` move
    on to the quantized layer's outputs.

    Each group of linears is calibrated on the inputs produced by the
    already-quantized groups before it.  One batch: a single forward, each
    group quantized in its first linear's pre-hook (before it runs).
    Several batches: one pass per group, each stopped at that group, then a
    last pass for the outputs.
    """
    linears = arch.layer_linears(layer)
    result: LayerWeights = {}

    def quantize(stage: tuple[str, ...], acc: HessianAccumulator) -> None:
        pairs = [(linear_bits(bits, name), name) for name in stage]
        weights = dict(zip(stage, _gptq_pairs(linears, acc.hessian(), spec, pairs)))
        write_weights(linears, weights)
        result.update(weights)

    def accumulator(stage: tuple[str, ...]) -> HessianAccumulator:
        return HessianAccumulator(linears[stage[0]].in_features, linears[stage[0]].weight.device)

    def quantize_on_arrival(stage: tuple[str, ...]) -> Callable[[torch.Tensor], None]:
        acc = accumulator(stage)

        def hook(x: torch.Tensor) -> None:
            acc.add(x)
            quantize(stage, acc)
        return hook

    def accumulate_and_stop(acc: HessianAccumulator) -> Callable[[torch.Tensor], None]:
        def hook(x: torch.Tensor) -> None:
            acc.add(x)
            raise _StopLayer
        return hook

    if len(signals) == 1:
        with _pre_hooks({linears[stage[0]]: quantize_on_arrival(stage) for stage in linear_stages(arch)}):
            run_layer(layer, index, signals, inputs)
        return result
    for stage in linear_stages(arch):
        acc = accumulator(stage)
        with _pre_hooks({linears[stage[0]]: accumulate_and_stop(acc)}):
            run_layer(layer, index, signals, inputs, keep=False)
        quantize(stage, acc)
    run_layer(layer, index, signals, inputs)
    return result


def capture(work: nn.Module, arch: Architecture, calibration: TokenWindows, batch_size: int) -> LayerInputs:
    device = next(work.parameters()).device
    return capture_layer_inputs(work, arch, calibration.input_ids, batch_size=batch_size, device=device)


@torch.no_grad()
def gptq_dense_signals(arch: Architecture, work: nn.Module, spec: QuantizerSpec, needs: dict[int, list[int]],
                       calibration: TokenWindows, batch_size: int,
                       progress: ProgressFn | None = None) -> dict[tuple[int, int], LayerWeights]:
    """GPTQ of each needed (layer, bits) pair on dense signals: ``{(layer, bits): weights}`` (on CPU).

    ``work``: a copy holding dense weights in every layer up to ``max(needs)`` (hooked, not changed).
    """
    layers = arch.decoder_layers(work)
    inputs = capture(work, arch, calibration, batch_size)
    signals = list(inputs.hidden)
    out: dict[tuple[int, int], LayerWeights] = {}
    last = max(needs)
    for i in range(last + 1):
        if i in needs:
            for b, weights in gptq_layer_dense(layers[i], i, arch, spec, needs[i], signals, inputs).items():
                out[(i, b)] = weights
        else:
            run_layer(layers[i], i, signals, inputs)
        if progress:
            progress(i + 1, last + 1)
    return out


@torch.no_grad()
def gptq_sequential(arch: Architecture, work: nn.Module, spec: QuantizerSpec, bits: Sequence[LayerBits],
                    weights: list[LayerWeights | None], calibration: TokenWindows, batch_size: int,
                    on_computed: Callable[[int, LayerWeights], None] | None = None,
                    progress: ProgressFn | None = None) -> list[LayerWeights]:
    """Fill the ``None`` entries of ``weights`` (layer ``i`` at ``bits[i]``), each layer calibrated on the
    quantized layers before it; the given entries are used as they are (cached results).

    ``work``: a copy with dense weights in the missing layers; overwritten (afterwards its layers up to
    the last computed one hold the quantized weights).  ``on_computed(i, weights)`` is called for each
    computed layer (to cache it).
    """
    missing = [i for i, w in enumerate(weights) if w is None]
    layers = arch.decoder_layers(work)
    last = missing[-1]
    for i in range(last):
        if weights[i] is not None:
            write_weights(arch.layer_linears(layers[i]), weights[i])
    inputs = capture(work, arch, calibration, batch_size)
    signals = list(inputs.hidden)
    for i in range(last + 1):
        if weights[i] is None:
            weights[i] = gptq_layer_sequential(layers[i], i, arch, spec, bits[i], signals, inputs)
            if on_computed is not None:
                on_computed(i, weights[i])
        elif i < last:
            run_layer(layers[i], i, signals, inputs)
        if progress:
            progress(i + 1, last + 1)
    return weights
