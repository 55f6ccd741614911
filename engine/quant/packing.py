"""Codes packed in memory: several codes per byte, unpacked with byte shifts only.

A quantized weight's codes live in memory packed into power-of-two slots
along each row: 2-bit codes four to a byte, 3- and 4-bit codes two to a byte,
5- to 8-bit codes one to a byte (:func:`slot_bits`).  Slots keep unpacking to
a few uint8 shifts and masks, fast enough to run inside every forward; a
3-bit code then takes 4 bits in memory (files on disk pack every width
exactly, :mod:`engine.quant.files`).

Layout: code ``j`` of a row sits in byte ``j // per_byte`` at bit offset
``(j % per_byte) * slot`` (little-endian within the byte); a row is padded with
zero codes to a whole byte.
"""

from __future__ import annotations

import torch

from engine.core.memory import packed_row_bytes, slot_bits

__all__ = ["slot_bits", "packed_row_bytes", "pack_rows", "unpack_rows"]


def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[out, in]`` -> packed uint8 ``[out, packed_row_bytes(in, bits)]`` (same device)."""
    slot = slot_bits(bits)
    if slot == 8:
        return codes.to(torch.uint8).clone(memory_format=torch.contiguous_format)  # never the caller's tensor
    per_byte = 8 // slot
    out, inp = codes.shape
    masked = codes.to(torch.uint8) & ((1 << slot) - 1)  # a code can never spill into its neighbour's slot
    padded = torch.nn.functional.pad(masked, (0, (-inp) % per_byte)).view(out, -1, per_byte)
    packed = padded[..., 0].clone()
    for k in range(1, per_byte):
        packed |= padded[..., k] << (k * slot)
    return packed


def unpack_rows(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: uint8 codes ``[out, in_features]`` (read-only: at 5-8 bits this is the
    packed tensor itself)."""
    slot = slot_bits(bits)
    if slot == 8:
        return packed
    per_byte, mask = 8 // slot, (1 << slot) - 1
    parts = [(packed >> (k * slot)) & mask for k in range(per_byte)]
    return torch.stack(parts, dim=-1).view(packed.shape[0], -1)[:, :in_features]
