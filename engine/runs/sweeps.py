"""Sweeps: grids of plans, run one after another, every point's error kept instead of stopping the sweep.

The one place sweeps are generated, for pages and CLI alike: a slicing sweep
is constant slicing at each target plus dynamic slicing at each (target,
basis) with basis <= target; a quantization sweep is every (low bits,
ordering, low-bit fraction).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from engine.core.out_of_memory import RunOutOfMemory
from engine.core.progress import StageProgress
from engine.methods import method_for
from engine.runs.plans import QuantPlan, SlicingPlan
from engine.runs.runner import RunOutcome


def grid(*axes: Sequence) -> list[tuple]:
    """Cartesian product of the axes, in order (first axis slowest)."""
    points: list[tuple] = [()]
    for axis in axes:
        points = [p + (v,) for p in points for v in axis]
    return points


def slicing_sweep(base: SlicingPlan, targets: Sequence[float], bases: Sequence[float],
                  schedules: Sequence[str] = ("constant", "dynamic")) -> list[SlicingPlan]:
    """Constant slicing at each target; dynamic at each (target, basis) with basis <= target."""
    unknown = set(schedules) - {"constant", "dynamic"}
    if unknown:
        raise ValueError(f"A slicing sweep takes 'constant' and/or 'dynamic' schedules, not {sorted(unknown)}.")
    plans = []
    if "constant" in schedules:
        plans += [replace(base, schedule="constant", target=t, basis=t, fractions=()) for t in targets]
    if "dynamic" in schedules:
        plans += [replace(base, schedule="dynamic", target=t, basis=b, fractions=())
                  for t, b in grid(targets, bases) if b <= t]
    return plans


def quantization_sweep(base: QuantPlan, low_bits: Sequence[int], orderings: Sequence[str],
                       low_fractions: Sequence[float]) -> list[QuantPlan]:
    """Every (low bits, ordering, fraction of layers at the low level) of the paper's ordering chart."""
    unknown = set(orderings) - {"lim", "zd", "random", "reversed-lim"}
    if unknown:
        raise ValueError(f"A quantization sweep takes orderings lim, zd, random, reversed-lim; not {sorted(unknown)}.")
    return [replace(base, low_bits=b, ordering=o, low_fraction=f, target_bits=None, custom_order=())
            for b, o, f in grid(low_bits, orderings, low_fractions)]


@dataclass
class SweepResult:
    """Stored outcomes and, per failed point, its plan and the message."""

    outcomes: list[RunOutcome] = field(default_factory=list)
    errors: list[tuple[object, str]] = field(default_factory=list)


def run_sweep(plans: Sequence, run_one: Callable[[object], RunOutcome],
              progress: StageProgress | None = None) -> SweepResult:
    """Run ``run_one(plan)`` for every plan; a point that fails with a ValueError is recorded and skipped.

    Running out of memory stops the sweep (the next points would need as much): its message is recorded
    against the failed point, with how many runs before it were stored.
    """
    result = SweepResult()
    for done, plan in enumerate(plans, start=1):
        try:
            result.outcomes.append(run_one(plan))
        except RunOutOfMemory as err:
            result.errors.append((plan, f"{err} The sweep stopped here ({done - 1} of {len(plans)} points run; "
                                        f"{len(result.outcomes)} stored)."))
            break
        except ValueError as err:  # every engine input error is a ValueError
            result.errors.append((plan, str(err)))
        if progress is not None:
            progress("runs", done, len(plans))
    return result


# ---------------------------------------------------------------- every method at matched sizes


@dataclass(frozen=True)
class MatchedPoint:
    """One planned run of the all-methods sweep: its plan and the size it should land at."""

    plan: object
    target: float
    predicted_size: float

    @property
    def method(self) -> str:
        """The name of the method that runs the plan (as its runs are stored)."""
        return method_for(self.plan).name


def _drop_points(loaded, targets: Sequence[float]) -> list[MatchedPoint]:
    """Drop whole layers / attention / MLP blocks: how many of each come closest to each size (at or below)."""
    from engine.core.architectures import get_submodule
    from engine.runs.plans import DropPlan

    arch = loaded.architecture
    layer = arch.decoder_layers(loaded.model)[0]
    dense = sum(p.numel() for p in loaded.model.parameters())
    unit = {"layer": sum(p.numel() for p in layer.parameters()),
            "attention": sum(p.numel() for p in get_submodule(layer, arch.attention).parameters())
            + sum(p.numel() for p in get_submodule(layer, arch.attn_norm).parameters()),
            "mlp": sum(p.numel() for p in get_submodule(layer, arch.mlp).parameters())
            + sum(p.numel() for p in get_submodule(layer, arch.mlp_norm).parameters())}
    points, droppable = [], loaded.num_layers - 2  # first and last protected
    for block, size in unit.items():
        by = "lr" if block == "layer" else block
        for target in targets:
            count = math.ceil((1 - target) * dense / size - 1e-9)
            if 0 < count <= droppable:
                points.append(MatchedPoint(DropPlan(block, count, by), target, 1 - count * size / dense))
    return points


def _quant_points(loaded, targets: Sequence[float], base: QuantPlan) -> list[MatchedPoint]:
    """Two-level LIM allocations: for each size, the mix with the most bits that still fits (sizes at 16 bits),
    among the level pairs the plan's target runtime runs."""
    from engine.quant.allocation import allocate_fraction
    from engine.quant.runtimes import runtime_named
    from engine.quant.size import size_report

    n = loaded.num_layers
    order = list(range(n))  # sizes do not depend on which layers are low, only on how many
    allowed = runtime_named(base.runtime).levels
    candidates = []
    for high, low in ((8, 6), (8, 4), (6, 4), (4, 3), (4, 2), (3, 2)):
        if not {high, low} <= set(allowed):
            continue
        for n_low in range(n + 1):
            allocation = allocate_fraction(order, high, low, n_low / n)
            size = size_report(loaded.model, loaded.architecture, allocation.bits, base.spec(),
                               runtime_named(base.runtime).packs_zero_points).compression_16bit
            candidates.append((allocation.average_bits, high, low, n_low / n, size))
    points = []
    for target in targets:
        fitting = [c for c in candidates if c[4] <= target + 1e-9]
        best = max(fitting, key=lambda c: (c[0], c[4])) if fitting else None
        if best is not None:
            _bits, high, low, fraction, size = best
            plan = replace(base, high_bits=high, low_bits=low, low_fraction=fraction, target_bits=None, ordering="lim")
            points.append(MatchedPoint(plan, target, size))
    return points


def parse_sizes(text: str) -> list[float]:
    """``"0.9, 0.75, 60%"`` -> ``[0.9, 0.75, 0.6]`` (largest first); a clear ValueError for anything else."""
    sizes = []
    for part in (p.strip() for p in text.replace(";", ",").split(",")):
        if not part:
            continue
        try:
            value = float(part[:-1]) / 100 if part.endswith("%") else float(part)
        except ValueError:
            raise ValueError(f"'{part}' is not a size: give fractions of the dense model like 0.9, 0.75 or 60%.")
        if not 0 < value < 1:
            raise ValueError(f"Size {part} is outside (0, 1): give fractions of the dense model's bytes.")
        sizes.append(value)
    if not sizes:
        raise ValueError("Give at least one size, e.g. 0.9, 0.75, 0.6, 0.5.")
    return sorted(set(sizes), reverse=True)


def matched_size_sweep(loaded, targets: Sequence[float], quant_base: QuantPlan = QuantPlan()) -> list[MatchedPoint]:
    """Dropping and quantization plans that land at (or just below) each size target, as a fraction of dense
    16-bit bytes.

    Slicing is not planned here: on small models the shortcut matrices and the untied head make sliced
    models larger than dense up to ~25% slicing, so its sizes cannot be matched; its stored runs still
    appear on the comparison chart.
    """
    if not targets or any(not 0 < t < 1 for t in targets):
        raise ValueError(f"Size targets are fractions of the dense model's bytes in (0, 1); got {list(targets)}.")
    points = _drop_points(loaded, targets) + _quant_points(loaded, targets, quant_base)
    unique: dict[tuple, MatchedPoint] = {}
    for point in points:  # e.g. 8 bits everywhere is the largest quantized model: several targets share it
        unique.setdefault((point.method, point.plan), point)
    return list(unique.values())
