"""llama.cpp's tensor types as LayerLab bit levels: which type a level means, and llama.cpp's fallbacks.

A level (2-8, what allocations, optimizers and sensitivity actions choose)
maps to one llama.cpp type in each *type set*:

=============  ====  ====  ====  ====  ====  ====
set             2     3     4     5     6     8
=============  ====  ====  ====  ====  ====  ====
k-quants       Q2_K  Q3_K  Q4_K  Q5_K  Q6_K  Q8_0
legacy          -     -    Q4_0  Q5_0   -    Q8_0
legacy+min      -     -    Q4_1  Q5_1   -    Q8_0
=============  ====  ====  ====  ====  ====  ====

k-quants pack 256 weights per block, so a row (a linear's input width) that
is not a multiple of 256 cannot hold them; llama.cpp's ``llama-quantize`` then
falls back (``tensor_type_fallback`` in ``src/llama-quant.cpp``): Q2_K and
Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, and F16 when even the
32-weight fallback does not fit.  LayerLab applies the same rule and shows it.
On SmolLM2-135M (width 576) and Gemma-3-270M (width 640) every linear but
``down_proj`` falls back.

The output matrix (and the embedding it is tied to) follows llama.cpp's
output rule: Q6_K, or Q8_0 when its rows are not a multiple of 256.

Bits per weight are the type's bytes per block x 8 / weights per block
(4.5 for Q4_K, 8.5 for Q8_0), as llama.cpp reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

TYPE_SETS: dict[str, dict[int, str]] = {
    "k-quants": {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"},
    "legacy": {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"},
    "legacy+min": {4: "Q4_1", 5: "Q5_1", 8: "Q8_0"},
}
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
OUTPUT_TYPES = ("auto", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "F16")


class TypeChoiceError(ValueError):
    """A level or type llama.cpp cannot provide here; the message names what would work."""


def block_size(qtype: str) -> int:
    """Weights per block of ``qtype`` (1 for F16/F32)."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][0]


def bits_per_weight(qtype: str) -> float:
    """Stored bits per weight of ``qtype`` (scales included): 4.5 for Q4_K, 8.5 for Q8_0, 16 for F16."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return 8.0 * size / block


def tensor_bytes(qtype: str, rows: int, n_per_row: int) -> int:
    """Bytes of a ``[rows, n_per_row]`` tensor stored as ``qtype``."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    if n_per_row % block:
        raise TypeChoiceError(f"{qtype} needs rows that are a multiple of {block} weights, not {n_per_row}.")
    return rows * (n_per_row // block) * size


def levels(type_set: str) -> tuple[int, ...]:
    """The levels a type set offers, e.g. ``(2, 3, 4, 5, 6, 8)`` for k-quants."""
    return tuple(_type_set(type_set))


def _type_set(type_set: str) -> dict[int, str]:
    if type_set not in TYPE_SETS:
        raise TypeChoiceError(f"Unknown llama.cpp type set '{type_set}'; choose one of {', '.join(TYPE_SETS)}.")
    return TYPE_SETS[type_set]


@dataclass(frozen=True)
class TypeChoice:
    """The type one tensor gets: ``wanted`` by its level, ``qtype`` after llama.cpp's fallback."""

    wanted: str
    qtype: str

    @property
    def fell_back(self) -> bool:
        return self.wanted != self.qtype

    def label(self) -> str:
        return self.qtype if not self.fell_back else f"{self.qtype} (for {self.wanted})"


def fallback(wanted: str, n_per_row: int) -> str:
    """llama.cpp's type for a tensor whose rows hold ``n_per_row`` weights when ``wanted`` was asked for."""
    if n_per_row % block_size(wanted) == 0:
        return wanted
    qtype = FALLBACK.get(wanted, wanted)
    return qtype if n_per_row % block_size(qtype) == 0 else "F16"


def type_for_level(level: int, n_per_row: int, type_set: str = "k-quants") -> TypeChoice:
    """The llama.cpp type of a linear at ``level`` whose rows hold ``n_per_row`` weights."""
    types = _type_set(type_set)
    if level not in types:
        raise TypeChoiceError(f"llama.cpp's {type_set} types have no {level}-bit type; choose one of "
                              f"{', '.join(f'{b} ({t})' for b, t in types.items())}.")
    wanted = types[level]
    return TypeChoice(wanted, fallback(wanted, n_per_row))


def output_type(n_per_row: int, requested: str = "auto") -> TypeChoice:
    """Type of the output matrix (and a tied embedding): llama.cpp's rule for ``auto``, else ``requested``
    (with the fallback for its row length)."""
    if requested not in OUTPUT_TYPES:
        raise TypeChoiceError(f"Unknown output type '{requested}'; choose one of {', '.join(OUTPUT_TYPES)}.")
    if requested == "auto":
        qtype = "Q6_K" if n_per_row % 256 == 0 else "Q8_0"
        return TypeChoice(qtype, qtype)
    return TypeChoice(requested, fallback(requested, n_per_row))
