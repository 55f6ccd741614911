"""What the bits solver minimises: per-unit damage at each level, made safe to sum.

Pure math, no models.  The sensitivity lab measures, for each unit (a layer,
or one linear of a layer) quantized alone at each level, two damages on the
calibration windows, both in nats per token:

- **KL** between the dense and the modified model's next-token
  distributions: always ≥ 0 and smooth, but it weighs every vocabulary
  entry, including shifts among tokens the text never uses;
- **ΔNLL**, the change of the text's own negative log-likelihood: what
  perplexity measures, but noisy (a few thousand tokens), so some units read
  ≈ 0 or below by chance.

Summing raw ΔNLL lets the solver exploit that luck (it put linears whose ΔNLL
was within noise of zero at 2 bits, measured 35% worse than LIM on the built-in
model); summing KL over-protects units with large but harmless shifts (``v``).
:func:`upper_dnll` takes ΔNLL plus one standard error over windows, and
:func:`blended` (what the solver uses) the mean of KL and ΔNLL plus one
standard error; both are made *monotone*: never below zero and never smaller
at fewer bits, which a unit's true damage is not either.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def monotone_in_bits(row: Sequence[float]) -> list[float]:
    """``row[j]``: damage at the ``j``-th level, levels ascending. Clipped at 0 (NaN, a diverged measurement,
    becomes infinite: never chosen), then raised so that no level damages less than a level above it (a running
    maximum from the highest level down)."""
    out = [math.inf if math.isnan(x) else max(0.0, float(x)) for x in row]  # a failed measurement is not free
    for j in range(len(out) - 2, -1, -1):
        out[j] = max(out[j], out[j + 1])
    return out


def standard_error(window_values: Sequence[float]) -> float:
    """Standard error of the mean of per-window values (0 for a single window)."""
    n = len(window_values)
    return statistics.stdev(window_values) / math.sqrt(n) if n > 1 else 0.0


def upper_dnll(dnll: Sequence[float], window_dnll: Sequence[Sequence[float]]) -> list[float]:
    """ΔNLL at each level plus one standard error over its windows, monotone (nats/token).

    ``dnll[j]``: mean over all tokens at level ``j``; ``window_dnll[j]``: the per-window means behind it."""
    return monotone_in_bits(_plus_standard_error(dnll, window_dnll))


def _plus_standard_error(dnll: Sequence[float], window_dnll: Sequence[Sequence[float]]) -> list[float]:
    return [d + standard_error(w) for d, w in zip(dnll, window_dnll, strict=True)]


def blended(kl: Sequence[float], dnll: Sequence[float], window_dnll: Sequence[Sequence[float]]) -> list[float]:
    """Mean of KL and ΔNLL plus one standard error at each level, then monotone (nats/token).

    The mean is taken before the monotone step: making ΔNLL + SE monotone first raised the low levels of
    units with noisy high levels and measured worse (per linear at 3.5 bits on the built-in model, 68.8 against
    66.1 on fresh evaluation windows; docs/benchmarks.md)."""
    return monotone_in_bits([(a + b) / 2 for a, b in zip(kl, _plus_standard_error(dnll, window_dnll), strict=True)])
