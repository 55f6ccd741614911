"""Honest size of a layer-wise quantized model (docs/methods.md §4).

Bits per weight include the fp16 scale and fp16 zero point of every group
(4 bits, group 128: 4.25), and every parameter that stays unquantized
(embedding, untied head, norms, biases) is listed in bytes at the model dtype
and as a fraction of the dense model's bytes.  Pure arithmetic on shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from torch import nn

from engine.core.architectures import Architecture
from engine.quant.ggml_types import tensor_bytes, type_for_level
from engine.quant.grid import LLAMACPP, QuantizationError, QuantizerSpec, weight_storage_bits
from engine.quant.layer_bits import LayerBits, linear_bits, normalize_all


@dataclass(frozen=True)
class SizeReport:
    """Honest storage of a quantized model, in bytes (8 bits) unless stated.

    ``bits_per_weight`` includes scales and zero points; ``unquantized`` maps
    embedding / head / norms / biases / other to bytes kept at the model dtype.
    """

    dense_bytes: int
    quantized_weights: int
    quantized_bytes: float
    bits_per_weight: float
    code_bits_per_weight: float
    unquantized: dict[str, int]
    per_layer_bits_per_weight: list[float]
    notes: list[str]
    dense_params: int = 0
    unquantized_params: int = 0
    file_bytes: float | None = None  # the deployed file's exact bytes, where the format fixes them (GGUF)

    @property
    def unquantized_bytes(self) -> int:
        return sum(self.unquantized.values())

    @property
    def total_bytes(self) -> float:
        return self.quantized_bytes + self.unquantized_bytes

    @property
    def unquantized_fraction(self) -> float:
        """Unquantized bytes as a fraction of the dense model's bytes."""
        return self.unquantized_bytes / self.dense_bytes

    @property
    def compression(self) -> float:
        """Quantized model bytes / dense model bytes."""
        return self.total_bytes / self.dense_bytes

    @property
    def total_bytes_16bit(self) -> float:
        """Bytes as deployed: the file's exact bytes where known (llama.cpp's types: the GGUF file), else every
        unquantized parameter at 16 bits (fp16 / bf16: how models are deployed)."""
        if self.file_bytes is not None:
            return self.file_bytes
        return self.quantized_bytes + 2 * self.unquantized_params

    @property
    def compression_16bit(self) -> float:
        """:attr:`total_bytes_16bit` / bytes of the dense model at 16 bits: the honest size fraction."""
        return self.total_bytes_16bit / (2 * self.dense_params)

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes_16bit": self.total_bytes_16bit,
                "compression_16bit": self.compression_16bit, "unquantized_bytes": self.unquantized_bytes,
                "total_bytes": self.total_bytes,
                "unquantized_fraction": self.unquantized_fraction, "compression": self.compression,
                "unquantized_fractions": {k: v / self.dense_bytes for k, v in self.unquantized.items()}}


def linear_storage(linear: nn.Module, bits: int, spec: QuantizerSpec, packed_zeros: bool = False) -> int:
    """Storage bits of one linear's weight at ``bits`` (codes, scales, zeros; ``packed_zeros``: integer zero points
    at the code width, as in a compressed-tensors checkpoint)."""
    out, inp = linear.weight.shape
    if spec.method == LLAMACPP:
        return 8 * tensor_bytes(type_for_level(bits, int(inp), spec.ggml_types).qtype, int(out), int(inp))
    return weight_storage_bits(out, inp, bits, spec.group_size, spec.stores_group_index, spec.zero_point_at(bits),
                               packed_zeros)


def layer_storage(arch: Architecture, layer: nn.Module, bits: LayerBits, spec: QuantizerSpec,
                  packed_zeros: bool = False) -> tuple[int, int, set[int]]:
    """Storage bits and weight count of one decoder layer's linears at ``bits`` (one level, or one per linear:
    :mod:`engine.quant.layer_bits`), and the ids of the parameters they quantize (fused experts: the 3-D
    tensor)."""
    layer_bits = layer_weights = 0
    ids = set()
    for name, linear in arch.layer_linears(layer).items():
        out, inp = linear.weight.shape
        layer_bits += linear_storage(linear, linear_bits(bits, name), spec, packed_zeros)
        layer_weights += out * inp
        ids.add(id(getattr(linear, "parameter", linear.weight)))
    return layer_bits, layer_weights, ids


def size_report(model: nn.Module, arch: Architecture, bits: Sequence[LayerBits], spec: QuantizerSpec,
                packed_zeros: bool = False) -> SizeReport:
    """Bytes of ``model`` with layer ``i``'s linears at ``bits[i]`` (one level, or one per linear; tied weights
    counted once; ``packed_zeros``: integer zero points at the code width, as a compressed-tensors checkpoint
    holds them)."""
    layers = arch.decoder_layers(model)
    bits = check_bits(bits, len(layers), list(arch.linears))
    quantized_ids, per_layer, q_bits, code_bits, n_weights = set(), [], 0, 0, 0
    for layer, b in zip(layers, bits):
        layer_bits, layer_weights, ids = layer_storage(arch, layer, b, spec, packed_zeros)
        codes = sum(linear_bits(b, name) * linear.weight.numel() for name, linear in arch.layer_linears(layer).items())
        quantized_ids.update(ids)
        per_layer.append(layer_bits / layer_weights)
        q_bits, code_bits, n_weights = q_bits + layer_bits, code_bits + codes, n_weights + layer_weights
    unquantized = {"embedding": 0, "head": 0, "norms": 0, "biases": 0, "other": 0}
    dense = dense_params = unquantized_params = 0
    for name, param in model.named_parameters():  # shared (tied) parameters appear once
        nbytes = param.numel() * param.element_size()
        dense += nbytes
        dense_params += param.numel()
        if id(param) in quantized_ids:
            continue
        unquantized_params += param.numel()
        if name.startswith(arch.embedding + "."):
            unquantized["embedding"] += nbytes
        elif name.startswith(arch.head + "."):
            unquantized["head"] += nbytes
        elif "norm" in name:
            unquantized["norms"] += nbytes
        elif name.endswith(".bias"):
            unquantized["biases"] += nbytes
        else:
            unquantized["other"] += nbytes
    if spec.method == LLAMACPP:
        notes = [f"llama.cpp's {spec.ggml_types} types as llama.cpp stores them (rows that are not a multiple of 256 "
                 "use llama.cpp's fallback type)", "the whole model's size is the GGUF file's bytes when the run "
                 "knows them (embedding and output in the output type, norms F32, metadata)"]
        return SizeReport(dense_bytes=dense, quantized_weights=n_weights, quantized_bytes=q_bits / 8,
                          bits_per_weight=q_bits / n_weights, code_bits_per_weight=code_bits / n_weights,
                          unquantized=unquantized, per_layer_bits_per_weight=per_layer, notes=notes,
                          dense_params=dense_params, unquantized_params=unquantized_params)
    zero_note = {"integer": "zero points are integers packed at the code width, as compressed-tensors stores them"
                 if packed_zeros else "zero points are integers stored as fp16 and counted at 16 bits",
                 "float": "each group stores its fp16 minimum as the zero point (16 bits)",
                 "symmetric": "symmetric grid: the zero point is fixed at 2^(bits-1) and not stored"}[spec.zero_point]
    if spec.zero_point_bits is not None and spec.zero_point != "symmetric":
        zero_note += (f" at {'/'.join(map(str, spec.zero_point_bits))} bits; other widths on the symmetric grid "
                      "(no zero point)")
    notes = ["codes are bit-packed at every width (3-bit included)", zero_note,
             f"unquantized parameters stay {str(next(model.parameters()).dtype).replace('torch.', '')}"]
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        notes.append("head is tied to the embedding and stored once")
    if spec.stores_group_index:
        notes.append("dynamic-group act-order GPTQ stores an int32 group index per input column")
    return SizeReport(dense_bytes=dense, quantized_weights=n_weights, quantized_bytes=q_bits / 8,
                      bits_per_weight=q_bits / n_weights, code_bits_per_weight=code_bits / n_weights,
                      unquantized=unquantized, per_layer_bits_per_weight=per_layer, notes=notes,
                      dense_params=dense_params, unquantized_params=unquantized_params)


def describe_size(size: SizeReport) -> str:
    """One sentence for captions: bits per weight, model size against dense at 16 bits, what stays unquantized."""
    kept = ", ".join(k for k, v in size.unquantized.items() if v) or "nothing"
    return (f"{size.bits_per_weight:.3f} bits per quantized weight with scales and zeros; model "
            f"{size.total_bytes_16bit / 2**20:.1f} MiB = {size.compression_16bit:.3f} of the dense model at 16 bits "
            f"({2 * size.dense_params / 2**20:.1f} MiB), unquantized parts ({kept}) counted at 16 bits.")


def check_bits(bits: Sequence[LayerBits], n_layers: int,
               linears: Sequence[str] | None = None) -> tuple[LayerBits, ...]:
    """One entry per layer, each a level or a level for every linear in ``linears`` (the short names); returns
    the entries in canonical form (:func:`engine.quant.layer_bits.normalize_all`)."""
    if len(bits) != n_layers:
        raise QuantizationError(f"Give one bit level per layer: the model has {n_layers} layers, got {len(bits)}.")
    return normalize_all(bits, linears)
