""""Find best schedule": the slicing basis SB and a measured per-layer schedule for a target SP.

1. Measure: the sensitivity lab's KL of slicing each layer alone by each of a
   few fractions (cached per model, data, windows, seqlen, fraction).
2. Predict, without slicing: every LR-dynamic schedule on a fine SB grid gets
   the summed interpolated damage of its layers
   (:func:`engine.optimize.slicing_budget.basis_grid`); the measured schedule is
   the exact knapsack over per-layer widths
   (:func:`~engine.optimize.slicing_budget.measured_widths`).
3. Check: the ``sb_checks`` best SB values by prediction, the low end of
   the range (SB = 0, pure LR-dynamic, or the lowest SB whose rounded widths
   reach SP) and the measured schedule are sliced
   for real and measured on *held-out* calibration windows (never evaluation
   text).  The low end is always checked because the additive prediction ranks SB
   poorly: slicing one layer alone does not see the errors that earlier
   sliced layers feed into its PCA (on the built-in model it predicted the
   optimum at SB ≈ 0.12 where the measured one is at 0).  Schedules whose rounded widths agree are
   the same model: they are sliced once and the result reused.  The best
   measured one is returned.

So a search costs a few slicings (``sb_checks`` + 2 at most) instead of one per
grid point, plus the measurement scans, which are cached and shared with the
Sensitivity page.  The result is cached in the store.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import pandas as pd

from engine.core.data import DataSpec, token_windows
from engine.core.keys import StoredKind
from engine.core.models import LoadedModel
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.progress import StageProgress, stage_callback
from engine.evaluation.perplexity import perplexity
from engine.optimize.slicing_budget import (
    DamageCurves,
    achieved,
    basis_grid,
    check_reachable,
    check_target,
    measured_widths,
    predicted_damage,
)
from engine.runs.bits_optimizer import DEFAULT_HELD_OUT, held_out_spec
from engine.runs.cached_scores import compute_scores
from engine.runs.plans import SlicingPlan
from engine.runs.store import ResultsStore
from engine.sensitivity.actions import Action
from engine.sensitivity.cached import measure_sensitivity, scan_estimate
from engine.sensitivity.errors import ScanCancelled
from engine.sensitivity.scan import StopCheck
from engine.slicing.schedules import SlicingSchedule, schedule_custom
from engine.slicing.slice_model import slice_model

SLICING_OPTIMIZER_VERSION = 3
OPTIMIZATIONS = StoredKind("slicing_optimizer", SLICING_OPTIMIZER_VERSION)
FRACTION_TOLERANCE = 1e-9
"""Candidates are compared at equal size: an SB schedule whose rounded widths remove less than SP is left out."""


@dataclass(frozen=True)
class SlicingOptimizerPlan:
    """Target SP, the per-layer fractions to measure, rounding, held-out windows, SB values checked for real."""

    target: float = 0.25
    fractions: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    round_to: int = 8
    held_out_windows: int = DEFAULT_HELD_OUT
    sb_checks: int = 1

    def actions(self) -> list[Action]:
        check_target(self.target)
        return [Action("slice", fraction=f) for f in sorted(set(self.fractions))]


@dataclass
class ScheduleCandidate:
    """One schedule tried: ``basis`` (LR-dynamic) or None (measured widths), its widths, predicted KL (sum of
    per-layer interpolations, nats/token), held-out perplexity and ΔNLL against dense; ``reused``: the
    candidate whose sliced model it shares (same widths)."""

    name: str
    basis: float | None
    dims: list[int]
    fraction: float
    predicted_kl: float
    measured_ppl: float = float("nan")
    measured_dnll: float = float("nan")
    reused: str | None = None

    def plan(self, target: float, round_to: int, hidden: int) -> SlicingPlan:
        """The plan a run of this candidate is stored under (``hidden``: the model's residual width)."""
        if self.basis is not None:
            return SlicingPlan("dynamic", target, self.basis, round_to=round_to)
        return SlicingPlan("custom", target, fractions=tuple(achieved(self.dims, hidden)), round_to=round_to)

    def schedule(self, hidden: int) -> SlicingSchedule:
        return schedule_custom(achieved(self.dims, hidden))


@dataclass
class SlicingOptimization:
    """Candidates (checked ones), the SB grid's predictions, the choice and what it all cost."""

    plan: SlicingOptimizerPlan
    candidates: list[ScheduleCandidate]
    chosen: int
    grid: list[dict] = field(default_factory=list)
    dense_ppl: float = float("nan")
    measured_on: str = ""
    held_out_on: str = ""
    slicings: int = 0
    seconds: float = 0.0

    @property
    def best(self) -> ScheduleCandidate:
        return self.candidates[self.chosen]

    def table(self) -> pd.DataFrame:
        return pd.DataFrame([{"candidate": c.name, "SB": c.basis, "achieved fraction": round(c.fraction, 4),
                              "predicted KL": c.predicted_kl, "held-out ppl": c.measured_ppl,
                              "measured ΔNLL": c.measured_dnll, "sliced": "reused " + c.reused if c.reused else "yes",
                              "chosen": i == self.chosen, "dims": " ".join(map(str, c.dims))}
                             for i, c in enumerate(self.candidates)])

    def summary(self) -> str:
        best = self.best
        others = [c for c in self.candidates if c is not best]
        text = (f"Chosen: {best.name} (average {best.fraction:.3f} removed), held-out perplexity "
                f"{best.measured_ppl:.2f} (dense {self.dense_ppl:.2f})")
        if others:
            runner_up = min(others, key=lambda c: c.measured_ppl)
            text += f", vs {runner_up.name} {runner_up.measured_ppl:.2f}"
        return (text + f". {self.slicings} slicings for {len(self.grid)} SB values predicted; measured on "
                f"{self.held_out_on}, damages from {self.measured_on}.")

    def to_dict(self) -> dict:
        return {"plan": asdict(self.plan), "candidates": [asdict(c) for c in self.candidates],
                "chosen": self.chosen, "grid": self.grid, "dense_ppl": self.dense_ppl,
                "measured_on": self.measured_on, "held_out_on": self.held_out_on, "slicings": self.slicings,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, payload: dict) -> SlicingOptimization:
        plan = dict(payload["plan"])
        plan["fractions"] = tuple(plan["fractions"])
        rest = {k: v for k, v in payload.items() if k not in ("plan", "candidates")}
        return cls(plan=SlicingOptimizerPlan(**plan),
                   candidates=[ScheduleCandidate(**c) for c in payload["candidates"]], **rest)


def _key(loaded: LoadedModel, plan: SlicingOptimizerPlan, calibration: DataSpec) -> str:
    return OPTIMIZATIONS.key(fingerprint=loaded.fingerprint, plan=asdict(plan), data=calibration.to_dict())


def slicing_optimization_if_cached(store: ResultsStore, loaded: LoadedModel, plan: SlicingOptimizerPlan,
                                   calibration: DataSpec) -> SlicingOptimization | None:
    payload = OPTIMIZATIONS.get(store, _key(loaded, plan, calibration))
    return None if payload is None else SlicingOptimization.from_dict(payload)


def slicing_optimize_estimate(store: ResultsStore, loaded: LoadedModel, plan: SlicingOptimizerPlan,
                              calibration: DataSpec) -> str:
    """Rough time of the measurement scans not cached yet (slicings come on top), for the button."""
    return scan_estimate(store, loaded, calibration, plan.actions()).text()


@explain_out_of_memory("The schedule search")
def optimize_slicing(store: ResultsStore, loaded: LoadedModel, plan: SlicingOptimizerPlan, calibration: DataSpec, *,
                     progress: StageProgress | None = None,
                     should_stop: StopCheck | None = None) -> SlicingOptimization:
    """Measure, predict, check on held-out windows; cached (see the module docstring)."""
    cached = slicing_optimization_if_cached(store, loaded, plan, calibration)
    if cached is not None:
        return cached
    start = time.perf_counter()
    target = check_target(plan.target)
    actions = plan.actions()
    check_reachable(target, plan.fractions, loaded.hidden_size, loaded.num_layers, plan.round_to)
    if plan.sb_checks < 1:
        raise ValueError(f"Check at least one SB value (got {plan.sb_checks}).")
    held_out = token_windows(held_out_spec(calibration, plan.held_out_windows), loaded.tokenizer, loaded.max_seqlen)
    hidden = loaded.hidden_size
    matrix = measure_sensitivity(store, loaded, calibration, actions, progress=progress, should_stop=should_stop)
    curves = DamageCurves(tuple(a.fraction for a in actions),
                          [[d.kl[i] for d in matrix.damages] for i in range(loaded.num_layers)])
    lr, _zd, _hit = compute_scores(store, loaded, calibration, progress=progress)
    grid = basis_grid(curves, lr.lr, target, hidden, plan.round_to)
    # compare at the same size: rounding can leave a schedule short of SP; those are not candidates
    fair = [g for g in grid if sum(achieved(g[2], hidden)) / len(g[2]) >= target - FRACTION_TOLERANCE]
    proposals: list[ScheduleCandidate] = []
    for sb, _schedule, dims, damage in sorted(fair, key=lambda g: (g[3], g[0])):
        if len(proposals) == plan.sb_checks:
            break
        if all(c.dims != dims for c in proposals):
            proposals.append(ScheduleCandidate(f"LR-dynamic SB={sb:g}", sb, dims, sum(achieved(dims, hidden)) /
                                               len(dims), damage))
    low_end = min(fair, key=lambda g: g[0], default=None)  # SB = 0, or the lowest SB whose widths reach SP
    if low_end is not None and all(c.dims != low_end[2] for c in proposals):
        proposals.append(ScheduleCandidate(f"LR-dynamic SB={low_end[0]:g} (low end)", low_end[0], low_end[2],
                                           sum(achieved(low_end[2], hidden)) / len(low_end[2]), low_end[3]))
    widths = measured_widths(curves, target, hidden, plan.round_to)  # always removes at least SP
    proposals.append(ScheduleCandidate("measured schedule", None, widths,
                                       sum(achieved(widths, hidden)) / len(widths),
                                       predicted_damage(curves, achieved(widths, hidden))))

    calibration_windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    dense = perplexity(loaded.model, held_out)
    slicings = 0
    for n, candidate in enumerate(proposals, 1):
        same = next((c for c in proposals[:n - 1] if c.dims == candidate.dims), None)
        if same is not None:
            candidate.reused, candidate.measured_ppl, candidate.measured_dnll = (
                same.name, same.measured_ppl, same.measured_dnll)
            continue
        if should_stop is not None and should_stop():
            raise ScanCancelled("Schedule search cancelled; nothing was stored.")
        sliced = slice_model(loaded, candidate.dims, calibration_windows, round_to=plan.round_to,
                             progress=stage_callback(progress, f"slicing {candidate.name} ({n}/{len(proposals)})"))
        slicings += 1
        result = perplexity(sliced.model, held_out)
        del sliced
        candidate.measured_ppl, candidate.measured_dnll = result.ppl, result.mean_nll - dense.mean_nll
    chosen = min(range(len(proposals)), key=lambda i: (proposals[i].measured_ppl, i))
    outcome = SlicingOptimization(plan, proposals, chosen,
                                  [{"SB": sb, "predicted KL": d, "achieved fraction": sum(achieved(dims, hidden)) /
                                    len(dims)} for sb, _s, dims, d in grid],
                                  dense.ppl, matrix.data_label, held_out.label(), slicings,
                                  time.perf_counter() - start)
    OPTIMIZATIONS.put(store, _key(loaded, plan, calibration), outcome.to_dict())
    return outcome
