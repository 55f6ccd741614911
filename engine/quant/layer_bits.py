"""The bits of one decoder layer: one level for all its linears, or a level per linear.

An allocation is a sequence with one entry per decoder layer.  An entry is
either an ``int`` (every linear of the layer at that many code bits, the
layer-wise allocation of docs/methods.md §4) or a mapping from the layer's
short linear names (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``, ``down``;
the architecture table's keys) to bits: a *per-module* allocation, as the
budget optimizer's module granularity returns.

:func:`normalize` makes entries canonical: a mapping whose linears all share
one level becomes that ``int``, so a per-module allocation that happens to be
uniform in a layer is stored, cached and drawn exactly as a per-layer one.
Mappings are plain ``dict`` (JSON as it is), sorted by the layer's own order.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

from engine.quant.grid import MAX_BITS, MIN_BITS, QuantizationError

LayerBits = int | dict[str, int]


def _level(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or int(value) != value \
            or not MIN_BITS <= int(value) <= MAX_BITS:
        raise QuantizationError(f"{where}: {value!r} bits is not a level; choose integers from {MIN_BITS} to "
                                f"{MAX_BITS}.")
    return int(value)


def normalize(entry: int | Mapping[str, int], linears: Sequence[str] | None = None) -> LayerBits:
    """The canonical form of one layer's bits (validated; a uniform mapping becomes an ``int``).

    ``linears``: the layer's short linear names; when given, a mapping must name each of them exactly once.
    """
    if not isinstance(entry, Mapping):
        return _level(entry, "A layer's bits")
    if linears is not None and sorted(entry) != sorted(linears):
        raise QuantizationError(f"Per-module bits must give every linear of the layer ({', '.join(linears)}); "
                                f"got {', '.join(entry) or 'none'}.")
    names = list(linears) if linears is not None else list(entry)
    levels = {name: _level(entry[name], f"Linear '{name}'") for name in names}
    distinct = set(levels.values())
    return distinct.pop() if len(distinct) == 1 else levels


def normalize_all(bits: Sequence[int | Mapping[str, int]],
                  linears: Sequence[str] | None = None) -> tuple[LayerBits, ...]:
    """:func:`normalize` for every layer's entry."""
    return tuple(normalize(entry, linears) for entry in bits)


def linear_bits(entry: LayerBits, name: str) -> int:
    """Code bits of the linear ``name`` in a layer whose bits are ``entry``."""
    return entry if isinstance(entry, int) else entry[name]


def levels_of(entry: LayerBits) -> list[int]:
    """The distinct levels one layer uses, ascending."""
    return [entry] if isinstance(entry, int) else sorted(set(entry.values()))


def all_levels(bits: Sequence[LayerBits]) -> list[int]:
    """The distinct levels an allocation uses, ascending."""
    return sorted({b for entry in bits for b in levels_of(entry)})


def mean_level(entry: LayerBits) -> float:
    """The layer's level, or its linears' mean level (unweighted: for sorting and per-layer charts)."""
    return float(entry) if isinstance(entry, int) else sum(entry.values()) / len(entry)


def is_per_module(bits: Sequence[LayerBits]) -> bool:
    """True when some layer's linears have different levels."""
    return any(not isinstance(entry, int) for entry in bits)


def describe(entry: LayerBits) -> str:
    """``"4"``, or ``"q4 k4 v6 o4 gate3 up3 down4"`` for a per-module layer."""
    return str(entry) if isinstance(entry, int) else " ".join(f"{name}{b}" for name, b in entry.items())


def describe_all(bits: Sequence[LayerBits]) -> str:
    """Every layer's :func:`describe`, per-module layers in brackets: ``"4 4 [q4 … down3] 3"``."""
    return " ".join(describe(e) if isinstance(e, int) else f"[{describe(e)}]" for e in bits)


def cache_form(entry: LayerBits) -> int | list[list]:
    """A JSON value for cache keys: the ``int``, or ``[[name, bits], ...]`` sorted by name (any dict order)."""
    return entry if isinstance(entry, int) else [[name, int(entry[name])] for name in sorted(entry)]
