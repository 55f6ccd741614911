"""Layer-wise mixed-precision quantization of a model copy (docs/methods.md §4).

``quantize_model(loaded, allocation, calibration, spec=spec)`` returns a
:class:`QuantizedModel`: a deep copy of the dense model whose decoder-layer
linears hold ``dequantize(stored)`` and the stored codes/scales/zeros.  The
input model is never modified, not even temporarily: every hook and every
stubbed layer lives on the copy.

Which signals calibrate GPTQ (``QuantizerSpec.propagation``):

- ``sequential`` (default, as GPTQ and llm-compressor do): layer ``i`` is
  calibrated on the outputs of the *already quantized* layers ``0..i-1``,
  and inside a layer the linears are quantized in the order they run
  (q/k/v, then o on the outputs of the quantized q/k/v, then gate/up, then
  down: "true sequential"), so later linears see, and compensate, the error
  of earlier ones.  A layer's result then depends on the bits of every
  earlier layer: the cache key holds that allocation prefix, and a new
  allocation recomputes every layer from the first one whose prefix changed.
- ``dense``: every linear is calibrated on the dense model's signals.  Then
  one (layer, bits) result does not depend on the other layers' levels and
  is computed once and cached: a new allocation only dequantizes cached
  cached codes into a new variant (fast what-ifs, somewhat less accurate).

RTN needs no signals: its (layer, bits) results are always independent.

Caches: in memory (LRU, bounded) and on disk under
``cache_root()/quant/<key>/``, keyed by model fingerprint, quantizer spec,
calibration windows (and the allocation prefix for sequential GPTQ).

Calibration (GPTQ): the layer-by-layer wiring (signals, Hessians from
pre-hooks, the two propagations) is :mod:`engine.quant.gptq_pipeline`.  GPTQ
needs several times more calibration tokens than a linear has inputs, or it
overfits the calibration text (:func:`calibration_warning`).

Saving and loading whole quantized models lives in ``engine.quant.save``;
byte accounting in :func:`size_report`.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from engine.core.architectures import Architecture
from engine.core.cpu import trim_freed_heap
from engine.core.data import TokenWindows
from engine.core.models import LoadedModel
from engine.core.progress import ProgressFn
from engine.quant.allocation import Allocation
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
from engine.quant.ggml_weight import ggml_quantize, with_output_type
from engine.quant.gptq_pipeline import gptq_dense_signals, gptq_sequential, restore_dense, write_weights
from engine.quant.grid import LLAMACPP, QuantizationError, QuantizerSpec, rtn_quantize
from engine.quant.imatrix import collect_importance
from engine.quant.layer_bits import LayerBits, all_levels, levels_of, linear_bits
from engine.quant.quantized_linear import can_hold_codes, quantized_variant
from engine.quant.size import SizeReport, check_bits, size_report

DEFAULT_BATCH = 4  # calibration windows per forward, unless sequential GPTQ takes them all at once
SEQUENTIAL_BATCH_TOKENS = 32768  # sequential GPTQ runs up to this many calibration tokens in one forward
__all__ = ["QuantizeStats", "QuantizedModel", "SizeReport", "size_report", "clear_memory_cache", "layer_weights",
           "allocation_weights", "prepare_levels", "apply_weights", "quantize_model",
           "calibration_warning", "resolve_batch_size"]


@dataclass
class QuantizeStats:
    """Where each (layer, bits) result came from, and the wall time (s)."""

    computed: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    seconds: float = 0.0


@dataclass
class QuantizedModel:
    """A quantized model.  ``model``'s layer linears compute with exactly ``weights[i][name].dequantize()``:
    either :class:`~engine.quant.quantized_linear.QuantizedLinear` layers holding those codes (then
    ``dense`` is the base model whose other tensors it shares) or a materialised copy (``dense`` None).

    ``bits[i]``: code bits of layer ``i`` (one level, or a level per linear:
    :mod:`engine.quant.layer_bits`); ``spec``: the quantizer (its own
    ``bits`` field is irrelevant); ``calibration``: description of the GPTQ
    windows (``None`` for RTN).
    """

    model: nn.Module
    architecture: Architecture
    spec: QuantizerSpec
    bits: tuple[LayerBits, ...]
    weights: list[LayerWeights]
    source: str = ""
    fingerprint: str = ""
    calibration: dict | None = None
    stats: QuantizeStats = field(default_factory=QuantizeStats)
    tokenizer: object = None
    warnings: list[str] = field(default_factory=list)
    dense: nn.Module | None = None

    def tensor_source(self) -> nn.Module:
        """A model with this one's names and shapes whose ``state_dict()`` materialises nothing: ``dense`` for a
        variant holding codes (its other tensors are ``dense``'s own), else ``model``.  Its layer linears'
        weights are not the quantized ones: read those from ``weights``."""
        return self.dense if self.dense is not None else self.model

    def size(self, packed_zeros: bool = False) -> SizeReport:
        """Bytes of the quantized model as stored (counted on :meth:`tensor_source`: same shapes; ``packed_zeros``:
        as a compressed-tensors checkpoint stores integer zero points)."""
        return size_report(self.tensor_source(), self.architecture, self.bits, self.spec, packed_zeros)


# --- the linears of a layer -------------------------------------------------------

def _rtn_layer(linears: dict[str, nn.Linear], spec: QuantizerSpec, levels: Sequence[int],
               importance: dict[str, torch.Tensor] | None = None) -> dict[int, LayerWeights]:
    """One layer's linears at each level by a quantizer that needs no signals (RTN, llama.cpp's types with
    the imatrix ``importance[name]`` when given); results on CPU."""
    cpu = torch.device("cpu")
    if spec.method == LLAMACPP:
        return {b: {name: ggml_quantize(linear.weight, b, spec.ggml_types,
                                        None if importance is None else importance[name])
                    for name, linear in linears.items()} for b in levels}
    return {b: {name: rtn_quantize(linear.weight, spec.with_bits(b)).to(cpu)
                for name, linear in linears.items()} for b in levels}


# --- independent (layer, bits) results: RTN and dense-signal GPTQ -------------------

@torch.no_grad()
def _compute_independent(loaded: LoadedModel, work: nn.Module, spec: QuantizerSpec, needs: dict[int, list[int]],
                         calibration: TokenWindows | None, batch_size: int,
                         progress: ProgressFn | None) -> dict[tuple[int, int], LayerWeights]:
    """Quantize the needed (layer, bits) pairs; ``work`` is a copy holding dense weights (GPTQ hooks it)."""
    arch = loaded.architecture
    layers = arch.decoder_layers(work)
    out: dict[tuple[int, int], LayerWeights] = {}
    if spec.method != "gptq":
        found = collect_importance(loaded, calibration, batch_size) if spec.imatrix else None
        for done, i in enumerate(sorted(needs), start=1):
            linears = arch.layer_linears(layers[i])
            importance = None if found is None else {name: found.mean(i, name) for name in linears}
            for b, weights in _rtn_layer(linears, spec, needs[i], importance).items():
                out[(i, b)] = weights
            if progress:
                progress(done, len(needs))
        return out
    return gptq_dense_signals(arch, work, spec, needs, calibration, batch_size, progress)


def _cached(key: str, layer: int, stats: QuantizeStats) -> LayerWeights | None:
    """A layer's weights from memory, else disk (then kept in memory), else ``None``; counted in ``stats``."""
    weights = memory_get(key, layer)
    if weights is not None:
        stats.memory_hits += 1
        return weights
    weights = disk_get(key, layer)
    if weights is not None:
        stats.disk_hits += 1
        memory_put(key, layer, weights)
    return weights


def _store(key: str, layer: int, weights: LayerWeights, spec: QuantizerSpec) -> None:
    memory_put(key, layer, weights)
    disk_put(key, layer, weights, spec)


def layer_weights(
    loaded: LoadedModel,
    spec: QuantizerSpec,
    needs: dict[int, Sequence[int]],
    calibration: TokenWindows | None = None,
    *,
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    work: nn.Module | None = None,
    stats: QuantizeStats | None = None,
) -> dict[tuple[int, int], LayerWeights]:
    """Quantized linears for each ``needs[layer] = [bits, ...]``: ``{(layer, bits): {name: weight}}``.

    Only for results that do not depend on other layers' bits (RTN and
    dense-signal GPTQ); sequential GPTQ goes through :func:`allocation_weights`.
    Served from memory, then disk, then computed (and stored) unless
    ``use_cache`` is false.  ``work`` is a copy GPTQ may hook and overwrite
    (deep-copied from ``loaded.model`` when needed and not given); the needed
    layers' dense weights are restored in it first.
    """
    if spec.sequential:
        raise QuantizationError("Sequential GPTQ results depend on the bits of earlier layers: quantize whole "
                                "allocations (allocation_weights / quantize_model), or use propagation='dense'.")
    stats = stats if stats is not None else QuantizeStats()
    batch_size = resolve_batch_size(spec, calibration, batch_size)
    if spec.needs_calibration and calibration is None:
        raise QuantizationError(f"{spec.label()} needs calibration windows; pass calibration=token_windows(...).")
    calib = calibration_id(calibration, batch_size) if spec.needs_calibration else None
    found: dict[tuple[int, int], LayerWeights] = {}
    missing: dict[int, list[int]] = {}
    for layer, levels in needs.items():
        for b in sorted(set(levels)):
            key = quant_cache_key(loaded, spec.with_bits(b), calib)
            weights = _cached(key, layer, stats) if use_cache else None
            if weights is None:
                missing.setdefault(layer, []).append(b)
            else:
                found[(layer, b)] = weights
    if not missing:
        if progress:
            progress(1, 1)
        return found
    if spec.method != "gptq":
        work = loaded.model  # RTN and llama.cpp's quantizer only read the dense weights
    else:
        if calibration is None:
            raise QuantizationError("GPTQ needs calibration windows; pass calibration=token_windows(...).")
        work = work if work is not None else copy.deepcopy(loaded.model)
        restore_dense(loaded, work, range(max(missing) + 1))
    for (layer, b), weights in _compute_independent(loaded, work, spec, missing, calibration, batch_size,
                                                    progress).items():
        stats.computed += 1
        found[(layer, b)] = weights
        if use_cache:
            _store(quant_cache_key(loaded, spec.with_bits(b), calib), layer, weights, spec.with_bits(b))
    return found


# --- sequential GPTQ: results depend on the allocation prefix -----------------------

@torch.no_grad()
def _sequential_weights(loaded: LoadedModel, work: nn.Module, spec: QuantizerSpec, bits: tuple[LayerBits, ...],
                        calibration: TokenWindows, batch_size: int, use_cache: bool, stats: QuantizeStats,
                        progress: ProgressFn | None) -> list[LayerWeights]:
    """Every layer's weights for ``bits``, layer ``i`` calibrated on the quantized layers ``0..i-1``.

    Cached layers are reused; the missing ones are computed in order on
    ``work`` (a copy, overwritten: afterwards its layers up to the last
    computed one hold the quantized weights), propagating calibration
    signals through the cached layers before them.
    """
    arch = loaded.architecture
    calib = calibration_id(calibration, batch_size)
    keys = [quant_cache_key(loaded, spec.with_bits(max(levels_of(b))), calib, prefix=bits[:i],
                            module_bits=None if isinstance(b, int) else b) for i, b in enumerate(bits)]
    weights: list[LayerWeights | None] = [_cached(key, i, stats) if use_cache else None for i, key in enumerate(keys)]
    missing = [i for i, w in enumerate(weights) if w is None]
    if not missing:
        if progress:
            progress(1, 1)
        return weights
    restore_dense(loaded, work, missing)

    def store(i: int, layer_weights_: LayerWeights) -> None:
        stats.computed += 1
        if use_cache:
            _store(keys[i], i, layer_weights_, spec.with_bits(max(levels_of(bits[i]))))

    return gptq_sequential(arch, work, spec, bits, weights, calibration, batch_size, store, progress)


def resolve_batch_size(spec: QuantizerSpec, calibration: TokenWindows | None, batch_size: int | None) -> int:
    """Calibration windows per forward.

    As given; else, for sequential GPTQ, as many windows as fit in
    :data:`SEQUENTIAL_BATCH_TOKENS` (all of them in the usual setups: then each
    layer runs once); else :data:`DEFAULT_BATCH`.
    """
    if batch_size is not None:
        if batch_size < 1:
            raise QuantizationError(f"Batch size {batch_size} is invalid: use at least 1 window per forward.")
        return batch_size
    if spec.sequential and calibration is not None:
        return max(1, min(calibration.n_windows, SEQUENTIAL_BATCH_TOKENS // calibration.seqlen))
    return DEFAULT_BATCH


def allocation_weights(
    loaded: LoadedModel,
    spec: QuantizerSpec,
    bits: Sequence[LayerBits],
    calibration: TokenWindows | None = None,
    *,
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    work: nn.Module | None = None,
    stats: QuantizeStats | None = None,
) -> list[LayerWeights]:
    """Quantized linears of every layer for the allocation ``bits`` (layer ``i`` at ``bits[i]``: one level, or
    a level per linear).

    ``work``: a copy of ``loaded.model`` GPTQ may hook and overwrite
    (deep-copied when needed and not given).
    """
    bits = check_bits(bits, loaded.num_layers, list(loaded.architecture.linears))
    stats = stats if stats is not None else QuantizeStats()
    if spec.needs_calibration and calibration is None:
        raise QuantizationError(f"{spec.label()} needs calibration windows; pass calibration=token_windows(...).")
    if spec.sequential:
        work = work if work is not None else copy.deepcopy(loaded.model)
        return _sequential_weights(loaded, work, spec, bits, calibration,
                                   resolve_batch_size(spec, calibration, batch_size), use_cache, stats, progress)
    found = layer_weights(loaded, spec, {i: levels_of(b) for i, b in enumerate(bits)}, calibration,
                          use_cache=use_cache, batch_size=batch_size, progress=progress, work=work, stats=stats)
    return [{name: found[(i, linear_bits(b, name))][name] for name in found[(i, levels_of(b)[0])]}
            for i, b in enumerate(bits)]


def prepare_levels(loaded: LoadedModel, spec: QuantizerSpec, levels: Sequence[int],
                   calibration: TokenWindows | None = None, *, batch_size: int | None = None,
                   progress: ProgressFn | None = None) -> QuantizeStats:
    """Fill the caches for what-if sweeps.

    Independent results (RTN, dense-signal GPTQ): every layer at every level.
    Sequential GPTQ: the uniform allocation of each level (its prefixes are
    what mixed allocations that start with that level reuse).
    """
    stats = QuantizeStats()
    start = time.perf_counter()
    if spec.sequential:
        work = copy.deepcopy(loaded.model)
        for b in levels:
            allocation_weights(loaded, spec, [b] * loaded.num_layers, calibration, batch_size=batch_size,
                               progress=progress, work=work, stats=stats)
    else:
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
        write_weights(arch.layer_linears(layer), layer_weights_)


def quantize_model(
    loaded: LoadedModel,
    allocation: Sequence[LayerBits] | Allocation,
    calibration: TokenWindows | None = None,
    *,
    spec: QuantizerSpec = QuantizerSpec(),
    use_cache: bool = True,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
) -> QuantizedModel:
    """A quantized variant of ``loaded.model`` with layer ``i`` at ``allocation[i]`` code bits (one level, or a
    level per linear: :mod:`engine.quant.layer_bits`).

    The variant holds the codes (:mod:`engine.quant.quantized_linear`) and shares every other
    tensor with ``loaded.model``; models whose linears are not all ``nn.Linear`` (fused experts,
    Conv1D) get a materialised copy instead (same logits).

    ``calibration`` is required for GPTQ.
    ``batch_size``: calibration windows per forward (default: see
    :func:`resolve_batch_size`); part of the GPTQ cache key.
    """
    start = time.perf_counter()
    bits = check_bits(allocation.bits if isinstance(allocation, Allocation) else allocation, loaded.num_layers,
                      list(loaded.architecture.linears))
    for b in all_levels(bits):
        spec.with_bits(b)  # validates every level before any work
    if spec.needs_calibration and calibration is None:
        raise QuantizationError(f"{spec.label()} needs calibration windows; pass calibration=token_windows(...).")
    holds_codes = can_hold_codes(loaded.model, loaded.architecture)
    target = None if holds_codes else copy.deepcopy(loaded.model)
    stats = QuantizeStats()
    batch_size = resolve_batch_size(spec, calibration, batch_size)
    # GPTQ works on the target copy itself (dense weights are restored where it needs them), or on a
    # transient copy of its own when the result holds codes (RTN only reads the dense weights)
    weights = allocation_weights(loaded, spec, bits, calibration, use_cache=use_cache, batch_size=batch_size,
                                 progress=progress, work=target, stats=stats)
    if holds_codes:
        target = quantized_variant(loaded.model, loaded.architecture, weights)
    else:
        apply_weights(target, loaded.architecture, weights)
        target.eval()
    trim_freed_heap()  # the per-linear temporaries of the build, before the variant is evaluated
    stats.seconds = time.perf_counter() - start
    gptq = spec.method == "gptq"
    warning = calibration_warning(loaded, calibration) if gptq else None
    if spec.method == LLAMACPP:
        target = with_output_type(target, loaded, spec)
    return QuantizedModel(model=target, architecture=loaded.architecture, spec=spec, bits=bits, weights=weights,
                          source=loaded.source, fingerprint=loaded.fingerprint,
                          dense=loaded.model if holds_codes else None,
                          calibration=calibration_id(calibration, batch_size) if spec.needs_calibration else None,
                          stats=stats, tokenizer=loaded.tokenizer, warnings=[warning] if warning else [])
