"""Layer-wise mixed-precision quantization of a model copy (METHODS.md section 4).

``quantize_model(loaded, allocation, calibration, spec=spec)`` returns a
:class:`QuantizedModel`: a deep copy of the dense model whose decoder-layer
linears hold ``dequantize(stored)`` and the stored codes/scales/zeros.  The
input model is never modified (GPTQ's hooks run on the copy).

What-if speed: the quantized weights of one layer at one bit level do not
depend on the other layers' levels, because GPTQ is calibrated on the
*dense* model's signals (each layer's linears see the inputs the unquantized
model gives them; no error feedback from earlier quantized layers).  That is
a deliberate *choice*: it costs a little accuracy against fully sequential
GPTQ but lets every (layer, bits) result be computed once and cached, in
memory (LRU, bounded) and on disk under ``cache_root()/quant/<key>/``, keyed by
model fingerprint, quantizer spec and calibration windows.  A new allocation
then only dequantizes cached codes into a copy and evaluates.

Calibration (GPTQ): the dense copy is run once over the windows with its
decoder layers replaced by recorders (catching each layer's arguments:
masks, rotary tables), then layer by layer: hooks on the linears accumulate
``H = 2/n Σ x xᵀ`` (q/k/v share one, gate/up share one) while the layer
computes the next layer's input.  Memory: one layer's Hessians plus the
windows' hidden states.  GPTQ needs several times more calibration tokens
than a linear has inputs, or it overfits the calibration text
(:func:`calibration_warning`).

Saving and loading whole quantized models lives in ``engine.quant_save``;
byte accounting in :func:`size_report`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.quant.allocation import Allocation
from engine.core.architectures import Architecture
from engine.core.data import TokenWindows
from engine.core.models import LoadedModel
from engine.quant.cache import (
    LayerWeights,
    calibration_id,
    clear_memory_cache,
    disk_get,
    disk_put,
    memory_get,
    memory_put,
    quant_cache_key,
)
from engine.quant.size import SizeReport, check_bits, size_report
from engine.quant.gptq import HessianAccumulator, prepare_hessian, quantize_weight
from engine.quant.grid import QuantizationError, QuantizedWeight, QuantizerSpec

ProgressFn = Callable[[int, int], None]
__all__ = ["QuantizeStats", "QuantizedModel", "SizeReport", "size_report", "clear_memory_cache", "layer_weights",
           "prepare_levels", "apply_weights", "quantize_model", "calibration_warning"]


@dataclass
class QuantizeStats:
    """Where each (layer, bits) result came from, and the wall time (s)."""

    computed: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    seconds: float = 0.0


@dataclass
class QuantizedModel:
    """A quantized copy.  ``model``'s layer linears hold exactly ``weights[i][name].dequantize()``.

    ``bits[i]``: code bits of layer ``i``; ``spec``: the quantizer (its own
    ``bits`` field is irrelevant); ``calibration``: description of the GPTQ
    windows (``None`` for RTN).
    """

    model: nn.Module
    architecture: Architecture
    spec: QuantizerSpec
    bits: tuple[int, ...]
    weights: list[LayerWeights]
    source: str = ""
    fingerprint: str = ""
    calibration: dict | None = None
    stats: QuantizeStats = field(default_factory=QuantizeStats)
    tokenizer: object = None
    warnings: list[str] = field(default_factory=list)

    def size(self) -> SizeReport:
        return size_report(self.model, self.architecture, self.bits, self.spec)


# --- computing layers ---------------------------------------------------------

class _LayerRecorder(nn.Module):
    """Stands in for a decoder layer: records its arguments and passes the hidden state through."""

    def __init__(self, index: int, sink: dict) -> None:
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, *args, **kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            hidden, rest = kwargs.pop("hidden_states"), ()
        self.sink.setdefault(self.index, []).append((rest, kwargs))
        if self.index == 0:
            self.sink.setdefault("hidden", []).append(hidden)
        return hidden


def _record_layer_inputs(model: nn.Module, arch: Architecture, windows: TokenWindows, batch_size: int) -> dict:
    """Layer-0 hidden states per batch and every layer's call arguments per batch."""
    layers = arch.decoder_layers(model)
    originals = list(layers)
    sink: dict = {}
    device = next(model.parameters()).device
    try:
        for i in range(len(layers)):
            layers[i] = _LayerRecorder(i, sink)
        for start in range(0, windows.n_windows, batch_size):
            batch = windows.input_ids[start : start + batch_size].to(device)
            model(input_ids=batch, use_cache=False, logits_to_keep=1)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    return sink


def _hessian_groups(arch: Architecture) -> dict[str, str]:
    """Short linear name -> name of the linear whose input Hessian it uses (shared inputs)."""
    groups = {}
    for name, path in arch.linears.items():
        for shared in (arch.attn_inputs, arch.mlp_inputs):
            if path in shared:
                first = next(n for n, p in arch.linears.items() if p in shared)
                groups[name] = first
                break
        else:
            groups[name] = name
    return groups


def _quantize_layer(linears: dict[str, nn.Linear], spec: QuantizerSpec, levels: list[int],
                    hessians: dict[str, torch.Tensor] | None) -> dict[int, LayerWeights]:
    """One layer's linears at each level; each Hessian prepared once for all levels. Results on CPU."""
    results: dict[int, LayerWeights] = {b: {} for b in levels}
    prepared_by_id: dict[int, object] = {}
    for name, linear in linears.items():
        prepared = None
        if hessians is not None:
            hessian = hessians[name]  # linears reading the same input share one tensor
            if id(hessian) not in prepared_by_id:
                prepared_by_id[id(hessian)] = prepare_hessian(hessian, spec.damp, spec.act_order)
            prepared = prepared_by_id[id(hessian)]
        for b in levels:
            weight = quantize_weight(linear.weight, spec.with_bits(b), prepared)
            results[b][name] = _to_device(weight, torch.device("cpu"))
    return results


def _to_device(weight: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    if weight.codes.device == device:
        return weight
    return QuantizedWeight(codes=weight.codes.to(device), scales=weight.scales.to(device),
                           zeros=weight.zeros.to(device), bits=weight.bits, group_size=weight.group_size,
                           method=weight.method, g_idx=None if weight.g_idx is None else weight.g_idx.to(device),
                           zero_point=weight.zero_point)


@torch.no_grad()
def _compute(loaded: LoadedModel, work: nn.Module, spec: QuantizerSpec, needs: dict[int, list[int]],
             calibration: TokenWindows | None, batch_size: int, progress: ProgressFn | None) -> dict:
    """Quantize the needed (layer, bits) pairs of the dense ``work`` copy: {(layer, bits): LayerWeights}."""
    arch = loaded.architecture
    layers = arch.decoder_layers(work)
    out: dict[tuple[int, int], LayerWeights] = {}
    if spec.method == "rtn":
        for done, i in enumerate(sorted(needs), start=1):
            for b, weights in _quantize_layer(arch.layer_linears(layers[i]), spec, needs[i], None).items():
                out[(i, b)] = weights
            if progress:
                progress(done, len(needs))
        return out
    if calibration is None:
        raise QuantizationError("GPTQ needs calibration windows; pass calibration=token_windows(...).")
    sink = _record_layer_inputs(work, arch, calibration, batch_size)
    hidden = sink["hidden"]
    groups = _hessian_groups(arch)
    last = max(needs)
    for i in range(last + 1):
        layer = layers[i]
        linears = arch.layer_linears(layer)
        accumulators, handles = {}, []
        if i in needs:
            for name in set(groups.values()):
                acc = HessianAccumulator(linears[name].in_features, linears[name].weight.device)
                accumulators[name] = acc
                handles.append(linears[name].register_forward_pre_hook(lambda _m, args, acc=acc: acc.add(args[0])))
        try:
            for b, (rest, kwargs) in enumerate(sink[i]):
                result = layer(hidden[b], *rest, **kwargs)
                hidden[b] = result[0] if isinstance(result, tuple) else result
        finally:
            for handle in handles:
                handle.remove()
        if i in needs:
            shared = {name: acc.hessian() for name, acc in accumulators.items()}
            hessians = {name: shared[groups[name]] for name in linears}
            for b, weights in _quantize_layer(linears, spec, needs[i], hessians).items():
                out[(i, b)] = weights
        if progress:
            progress(i + 1, last + 1)
    return out


def layer_weights(
    loaded: LoadedModel,
    spec: QuantizerSpec,
    needs: dict[int, Sequence[int]],
    calibration: TokenWindows | None = None,
    *,
    use_cache: bool = True,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
    work: nn.Module | None = None,
    stats: QuantizeStats | None = None,
) -> dict[tuple[int, int], LayerWeights]:
    """Quantized linears for each ``needs[layer] = [bits, ...]``: ``{(layer, bits): {name: weight}}``.

    Served from memory, then disk, then computed (and stored) unless
    ``use_cache`` is false.  ``work`` is a dense copy GPTQ may run hooks on
    (deep-copied from ``loaded.model`` when needed and not given); it must
    still hold the dense weights.
    """
    stats = stats if stats is not None else QuantizeStats()
    calib = calibration_id(calibration, batch_size) if spec.method == "gptq" else None
    found: dict[tuple[int, int], LayerWeights] = {}
    missing: dict[int, list[int]] = {}
    for layer, levels in needs.items():
        for b in sorted(set(levels)):
            key = quant_cache_key(loaded, spec.with_bits(b), calib)
            weights = memory_get(key, layer) if use_cache else None
            if weights is not None:
                stats.memory_hits += 1
            elif use_cache and (weights := disk_get(key, layer)) is not None:
                stats.disk_hits += 1
                memory_put(key, layer, weights)
            if weights is None:
                missing.setdefault(layer, []).append(b)
            else:
                found[(layer, b)] = weights
    if missing:
        if spec.method == "rtn":
            work = loaded.model  # RTN only reads the dense weights
        elif work is None:
            work = copy.deepcopy(loaded.model)
        computed = _compute(loaded, work, spec, missing, calibration, batch_size, progress)
        for (layer, b), weights in computed.items():
            stats.computed += 1
            found[(layer, b)] = weights
            if use_cache:
                key = quant_cache_key(loaded, spec.with_bits(b), calib)
                memory_put(key, layer, weights)
                disk_put(key, layer, weights, spec.with_bits(b))
    elif progress:
        progress(1, 1)
    return found


def prepare_levels(loaded: LoadedModel, spec: QuantizerSpec, levels: Sequence[int],
                   calibration: TokenWindows | None = None, *, batch_size: int = 4,
                   progress: ProgressFn | None = None) -> QuantizeStats:
    """Fill the caches with every layer at every level (for what-if sweeps)."""
    stats = QuantizeStats()
    start = time.perf_counter()
    needs = {i: list(levels) for i in range(loaded.num_layers)}
    layer_weights(loaded, spec, needs, calibration, batch_size=batch_size, progress=progress, stats=stats)
    stats.seconds = time.perf_counter() - start
    return stats


GPTQ_TOKENS_PER_INPUT = 4


def calibration_warning(loaded: LoadedModel, windows: TokenWindows | None) -> str | None:
    """A warning when GPTQ calibration is too small to generalise, else ``None``.

    GPTQ fits each linear to its calibration inputs; with fewer tokens than a
    few times the linear's input width the Hessian is poorly estimated and the
    result can be *worse than RTN* on other text (on SmolLM2-135M, 4 × 128
    tokens for ``down_proj``'s 1536 inputs did exactly that).
    """
    if windows is None:
        return None
    arch = loaded.architecture
    widest = max(lin.in_features for lin in arch.layer_linears(arch.decoder_layers(loaded.model)[0]).values())
    tokens = windows.n_windows * windows.seqlen
    if tokens >= GPTQ_TOKENS_PER_INPUT * widest:
        return None
    return (f"GPTQ is calibrated on {tokens} tokens but the widest linear has {widest} inputs: below about "
            f"{GPTQ_TOKENS_PER_INPUT * widest} tokens it overfits the calibration text and can do worse than RTN. "
            "Use more or longer calibration windows.")


@torch.no_grad()
def apply_weights(model: nn.Module, arch: Architecture, weights: Sequence[LayerWeights]) -> None:
    """Write ``dequantize(stored)`` into ``model``'s layer linears, in place (use on copies only)."""
    for layer, layer_weights_ in zip(arch.decoder_layers(model), weights):
        for name, linear in arch.layer_linears(layer).items():
            stored = _to_device(layer_weights_[name], linear.weight.device)
            linear.weight.copy_(stored.dequantize(linear.weight.dtype))


def quantize_model(
    loaded: LoadedModel,
    allocation: Sequence[int] | Allocation,
    calibration: TokenWindows | None = None,
    *,
    spec: QuantizerSpec = QuantizerSpec(),
    into: nn.Module | None = None,
    use_cache: bool = True,
    batch_size: int = 4,
    progress: ProgressFn | None = None,
) -> QuantizedModel:
    """A quantized copy of ``loaded.model`` with layer ``i`` at ``allocation[i]`` code bits.

    ``into``: an earlier copy of the same model (e.g. a previous
    ``QuantizedModel.model``) to overwrite instead of deep-copying again; it
    must not be ``loaded.model``.  ``calibration`` is required for GPTQ.
    """
    start = time.perf_counter()
    bits = tuple(int(b) for b in (allocation.bits if isinstance(allocation, Allocation) else allocation))
    check_bits(bits, loaded.num_layers)
    for b in set(bits):
        spec.with_bits(b)  # validates every level before any work
    if spec.method == "gptq" and calibration is None:
        raise QuantizationError("GPTQ needs calibration windows; pass calibration=token_windows(...).")
    if into is loaded.model:
        raise QuantizationError("Refusing to quantize the loaded model in place: pass a copy (or nothing) as 'into'.")
    target = into if into is not None else copy.deepcopy(loaded.model)
    stats = QuantizeStats()
    # a fresh copy is still dense, so GPTQ may calibrate on it; an earlier copy is not
    found = layer_weights(loaded, spec, {i: [b] for i, b in enumerate(bits)}, calibration,
                          use_cache=use_cache, batch_size=batch_size, progress=progress,
                          work=target if into is None else None, stats=stats)
    weights = [found[(i, b)] for i, b in enumerate(bits)]
    apply_weights(target, loaded.architecture, weights)
    target.eval()
    stats.seconds = time.perf_counter() - start
    gptq = spec.method == "gptq"
    warning = calibration_warning(loaded, calibration) if gptq else None
    return QuantizedModel(model=target, architecture=loaded.architecture, spec=spec, bits=bits, weights=weights,
                          source=loaded.source, fingerprint=loaded.fingerprint,
                          calibration=calibration_id(calibration, batch_size) if gptq else None,
                          stats=stats, tokenizer=loaded.tokenizer, warnings=[warning] if warning else [])
