""""Optimize for budget": bits per layer (or per linear) from measured damage, checked on held-out text.

1. Measure: the sensitivity lab's KL and ΔNLL of quantizing each *unit*
   alone at each allowed level (cached per model, data, windows, seqlen,
   level).  A unit is a layer (granularity ``layer``: all its linears at one
   level) or one linear of a layer (granularity ``module``: q, k, v, o, gate,
   up, down each get a level; one scan per linear and level, so 7× the
   measurements).
2. Solve: the ``k`` allocations of least summed damage whose honest size
   fits the budget (:mod:`engine.optimize.knapsack`, exact).  The damage is
   :func:`engine.optimize.damage.blended`: the mean of KL and a noise-aware
   ΔNLL, monotone in bits (why: that module's docstring and docs/benchmarks.md's
   benchmark, where it beat KL alone and ΔNLL alone); in llama.cpp's types, whose
   candidates are judged by KL divergence, the summed KL.
3. Check: damage is not exactly additive, so every solver candidate, the
   uniform allocation and the LIM / ZD / random orderings at the same budget
   (with llama.cpp's types also the largest two llama.cpp presets that fit,
   :mod:`engine.export.llamacpp_presets`; under vLLM q/k/v and gate/up are
   solved as one unit each) are quantized and measured on *held-out*
   calibration windows (the windows
   right after the ones measured on; never evaluation text).  The best
   measured one is returned, whichever produced it: the optimizer is never
   worse than what it competes with on that text.  "Best" is the lowest
   perplexity, or for llama.cpp's types the lowest KL divergence to dense
   (what llama.cpp's users compare files by); both are measured and shown.

The result is cached in the store, so a page rerun is instant; running the
chosen allocation (and the orderings) on evaluation text is
:func:`engine.runs.runner.run_quantization` with the allocation passed in.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

import pandas as pd

from engine.core.data import DataError, DataSpec, token_windows
from engine.core.keys import StoredKind
from engine.core.models import LoadedModel
from engine.core.out_of_memory import explain_out_of_memory
from engine.core.progress import StageProgress, stage_callback
from engine.evaluation.divergence import DenseReference, DivergenceMeter
from engine.evaluation.latency import describe_seconds
from engine.evaluation.perplexity import perplexity
from engine.export.gguf_llamacpp import llamacpp_details
from engine.methods import method_for
from engine.optimize.bit_budget import (
    DEFAULT_LEVELS,
    GRANULARITIES,
    BitBudget,
    BudgetError,
    LayerCosts,
    check_levels,
    layer_costs,
    tie_units,
)
from engine.optimize.knapsack import solve
from engine.optimize.unit_damage import allocation_from_units, summed_damage, unit_damage
from engine.quant.allocation import Allocation
from engine.quant.grid import LLAMACPP, QuantizationError, QuantizerSpec
from engine.quant.layer_bits import LayerBits, describe_all, mean_level, normalize
from engine.quant.quantize_model import quantize_model
from engine.quant.runtimes import DEFAULT_RUNTIME, fused_groups, runtime_named
from engine.runs.bits_competitors import competitors, presets_that_fit
from engine.runs.plans import QuantPlan
from engine.runs.store import ResultsStore
from engine.sensitivity.actions import Action
from engine.sensitivity.cached import measure_sensitivity, scan_estimate
from engine.sensitivity.errors import ScanCancelled
from engine.sensitivity.scan import StopCheck

OPTIMIZER_VERSION = 7  # 7: vLLM on the integer grid, 8-bit symmetric
# earlier: 6: llama.cpp's solver sums KL; 5: held-out KL divergence chooses; 4: presets compete
OPTIMIZATIONS = StoredKind("bits_optimizer", OPTIMIZER_VERSION)
DEFAULT_CANDIDATES = 5
# with 4, the held-out choice disagreed with evaluation text (bench/optimize.py, docs/benchmarks.md)
DEFAULT_HELD_OUT = 8


@dataclass(frozen=True)
class BitsOptimizerPlan:
    """What to optimize: the budget, allowed levels, quantizer grid, solver candidates, held-out windows, and
    whether each layer (``granularity="layer"``) or each linear of each layer (``"module"``) gets its level."""

    budget: BitBudget
    levels: tuple[int, ...] = DEFAULT_LEVELS
    quantizer: str = "rtn"
    group_size: int | None = 128
    candidates: int = DEFAULT_CANDIDATES
    held_out_windows: int = DEFAULT_HELD_OUT
    granularity: str = "layer"
    imatrix: bool = False  # llama.cpp quantizer only: the chosen allocation is quantized with an imatrix
    output_type: str = "auto"  # llama.cpp quantizer only: embedding / output type (and its bytes in the budget)
    runtime: str = DEFAULT_RUNTIME  # the target runtime: its levels and grid; vLLM ties q/k/v and gate/up

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise BudgetError(f"Unknown granularity '{self.granularity}': choose 'layer' (one level per layer) or "
                              "'module' (one level per linear of each layer).")
        runtime = runtime_named(self.runtime)
        problems = runtime.problems(self.quantizer, check_levels(self.levels), self.group_size, self.zero_point,
                                    act_order=self.quantizer == "gptq")
        if problems:
            raise BudgetError(runtime.refusal(problems))

    @property
    def zero_point(self) -> str:
        """The grid's zero point: the integer one unless the runtime takes only another (transformers: symmetric)."""
        return runtime_named(self.runtime).default_zero_point

    @property
    def judged_by(self) -> str:
        """What picks the candidate on held-out text: ``"kld"`` (KL divergence to dense) for llama.cpp's types,
        the measure llama.cpp's users compare files by (``llama-perplexity --kl-divergence``), else ``"ppl"``."""
        return "kld" if self.quantizer == LLAMACPP else "ppl"

    def measured(self, candidate: Candidate) -> float:
        """What the choice compares for ``candidate``: held-out KL divergence or perplexity (:attr:`judged_by`)."""
        return candidate.measured_kld if self.judged_by == "kld" else candidate.measured_ppl

    @property
    def tied(self) -> bool:
        """Whether fused linears (q/k/v, gate/up) share one level: the runtime loads them as one module."""
        return self.granularity == "module" and runtime_named(self.runtime).fused

    def spec(self) -> QuantizerSpec:
        """The quantizer at the highest level (GPTQ with static act-order, as the sensitivity lab measures it)."""
        if self.quantizer == LLAMACPP:  # damage is measured on k-quants without an imatrix (Action), sizes exact
            return QuantizerSpec(method=LLAMACPP, bits=max(check_levels(self.levels)), imatrix=self.imatrix,
                                 output_type=self.output_type)
        return QuantizerSpec(method=self.quantizer, bits=max(check_levels(self.levels)), group_size=self.group_size,
                             act_order=self.quantizer == "gptq", zero_point=self.zero_point,
                             zero_point_bits=runtime_named(self.runtime).zero_point_widths(self.zero_point))

    def actions(self, linears: list[str] | None = None) -> list[Action]:
        """The sensitivity actions to measure, level by level (per linear, ``linears`` in layer order, for
        ``granularity="module"``)."""
        modules = [None] if self.granularity == "layer" else list(linears or [])
        group = None if self.quantizer == LLAMACPP else self.group_size
        runtime = runtime_named(self.runtime)

        def zero(bits: int) -> str | None:  # the grid each level is quantized on (vLLM: 8-bit symmetric)
            grid = runtime.zero_point_at(bits, self.zero_point)
            return None if self.quantizer == LLAMACPP or grid == "integer" else grid

        return [Action(self.quantizer, bits=b, group_size=group, module=m, zero_point=zero(b))
                for b in check_levels(self.levels) for m in modules]

    def quant_plan(self, ordering: str = "optimizer", bits: list[int] | None = None) -> QuantPlan:
        """The plan a run of one candidate is stored under: the optimizer's levels, or for an ordering the two
        levels its ``bits`` use (so it joins the runs of that ordering and those levels)."""
        levels = check_levels(bits if ordering != "optimizer" and bits else self.levels)
        low_fraction = None if ordering == "optimizer" or not bits else bits.count(min(levels)) / len(bits)
        if ordering == "optimizer" and self.granularity == "module":
            ordering = "optimizer-module"
        return QuantPlan(quantizer=self.quantizer, group_size=self.group_size, high_bits=max(levels),
                         low_bits=min(levels), low_fraction=low_fraction, ordering=ordering,
                         act_order=self.quantizer == "gptq", imatrix=self.imatrix, output_type=self.output_type,
                         zero_point=self.zero_point, runtime=self.runtime)


@dataclass
class Candidate:
    """One allocation tried: where it came from, its size, the damage predicted and measured on held-out text.

    ``bits``: one entry per layer, a level or a level per linear (:mod:`engine.quant.layer_bits`);
    ``predicted_damage``: the blended sum (:func:`engine.optimize.damage.blended`; what the solver minimises
    except in llama.cpp's types, where it minimises ``predicted_kl``);
    ``predicted_kl`` / ``predicted_dnll``: sums of the raw per-unit measurements (all nats/token);
    ``measured_ppl`` / ``measured_dnll`` / ``measured_kld``: on the held-out windows (ΔNLL against dense and mean
    KL divergence to dense, nats/token).
    """

    name: str
    source: str  # "optimizer", "uniform", "ordering" or "preset" (a llama.cpp stock preset)
    bits: list[LayerBits]
    avg_bits: float
    model_bytes: float
    predicted_kl: float
    predicted_dnll: float
    predicted_damage: float = float("nan")
    measured_ppl: float = float("nan")
    measured_dnll: float = float("nan")
    measured_kld: float = float("nan")
    also: list[str] = field(default_factory=list)

    @property
    def ordering(self) -> str:
        """The QuantPlan ordering a run of this candidate is stored under."""
        return {"LIM ordering": "lim", "ZD ordering": "zd", "random ordering": "random"}.get(self.name, "optimizer")


@dataclass
class BitsOptimization:
    """Every candidate (solver's first), which one was chosen, and what it was measured on."""

    plan: BitsOptimizerPlan
    candidates: list[Candidate]
    chosen: int
    dense_ppl: float
    measured_on: str
    held_out_on: str
    budget_bits: int
    exact: bool
    solve_seconds: float
    seconds: float

    @property
    def best(self) -> Candidate:
        return self.candidates[self.chosen]

    def measured(self, candidate: Candidate) -> float:
        """What the choice compares: held-out KL divergence or perplexity (:attr:`BitsOptimizerPlan.judged_by`)."""
        return self.plan.measured(candidate)

    def _measured_text(self, candidate: Candidate) -> str:
        if self.plan.judged_by == "kld":
            return f"KL divergence {candidate.measured_kld:.4f}"
        return f"perplexity {candidate.measured_ppl:.2f}"

    def comparison_runs(self) -> list[tuple[str, Candidate]]:
        """``(ordering, candidate)`` to evaluate for a fair chart: the solver's best on held-out text (as
        ``optimizer``), then LIM, ZD and random at the same budget; each once."""
        solver = min((c for c in self.candidates if c.source == "optimizer"), key=self.measured)
        return [("optimizer", solver), *self.competitor_runs()]

    def competitor_runs(self) -> list[tuple[str, Candidate]]:
        """``(ordering, candidate)`` for LIM, ZD and random at this budget (also when a solver candidate has the
        same bits): the runs that put the orderings beside the optimizer on a trade-off chart."""
        out = []
        for name, ordering in (("LIM ordering", "lim"), ("ZD ordering", "zd"), ("random ordering", "random")):
            found = next((c for c in self.candidates if c.name == name or name in c.also), None)
            if found is not None:
                out.append((ordering, found))
        return out

    def allocation(self, candidate: Candidate | None = None) -> Allocation:
        """An :class:`Allocation` of ``candidate`` (default: the chosen one) for runs and bit-map charts."""
        c = candidate or self.best
        order = tuple(sorted(range(len(c.bits)), key=lambda i: (mean_level(c.bits[i]), i)))
        return Allocation(tuple(c.bits), order, note=f"{c.name}, budget {self.plan.budget.label()}")

    def table(self) -> pd.DataFrame:
        """One row per candidate: size, predicted and measured damage, chosen mark."""
        rows = [{"candidate": c.name + (f" (= {', '.join(c.also)})" if c.also else ""), "source": c.source,
                 "bits per weight": round(c.avg_bits, 4), "MiB": round(c.model_bytes / 2**20, 2),
                 "predicted damage": c.predicted_damage, "predicted KL": c.predicted_kl,
                 "predicted ΔNLL": c.predicted_dnll,
                 "held-out ppl": c.measured_ppl, "measured ΔNLL": c.measured_dnll, "held-out KLD": c.measured_kld,
                 "chosen": i == self.chosen, "bits": describe_all(c.bits)}
                for i, c in enumerate(self.candidates)]
        return pd.DataFrame(rows)

    def summary(self) -> str:
        """One sentence from the numbers: what was chosen and by how much it beat the best competitor."""
        best = self.best
        rivals = [c for c in self.candidates
                  if c.source != "optimizer" or any(not name.startswith("optimizer") for name in c.also)]
        text = (f"Chosen: {best.name} at {best.avg_bits:.3f} bits per weight, held-out perplexity "
                f"{best.measured_ppl:.2f} (dense {self.dense_ppl:.2f})")
        if self.plan.judged_by == "kld":
            text += f", KL divergence to dense {best.measured_kld:.4f} (what chose it)"
        if best.source == "optimizer" and best in rivals:
            text += f"; the solver's choice is also {', '.join(best.also)}"
        elif best.source == "optimizer" and rivals:
            rival = min(rivals, key=self.measured)
            text += (f"; {100 * (1 - self.measured(best) / self.measured(rival)):.1f}% below the best competitor "
                     f"({rival.name}, {self._measured_text(rival)})")
        elif best.source != "optimizer":
            solver = min((c for c in self.candidates if c.source == "optimizer"), key=self.measured)
            text += (f"; the solver's best ({solver.name}, {self._measured_text(solver)}) measured worse, so the "
                     "competitor is returned")
        return text + f". Measured on {self.held_out_on}; damages from {self.measured_on}."

    def to_dict(self) -> dict:
        return {"plan": {**asdict(self.plan), "budget": asdict(self.plan.budget)},
                "candidates": [asdict(c) for c in self.candidates], "chosen": self.chosen,
                "dense_ppl": self.dense_ppl, "measured_on": self.measured_on, "held_out_on": self.held_out_on,
                "budget_bits": self.budget_bits, "exact": self.exact, "solve_seconds": self.solve_seconds,
                "seconds": self.seconds}

    @classmethod
    def from_dict(cls, payload: dict) -> BitsOptimization:
        plan = dict(payload["plan"])
        plan["budget"] = BitBudget(**plan["budget"])
        plan["levels"] = tuple(plan["levels"])
        fields = {k: v for k, v in payload.items() if k not in ("plan", "candidates")}
        candidates = [Candidate(**{**c, "bits": [normalize(b) for b in c["bits"]]}) for c in payload["candidates"]]
        return cls(plan=BitsOptimizerPlan(**plan), candidates=candidates, **fields)


def held_out_spec(calibration: DataSpec, n_windows: int) -> DataSpec:
    """The ``n_windows`` calibration windows right after ``calibration``'s own (never evaluation text)."""
    if calibration.n_windows is None:
        raise DataError("Held-out checks need calibration windows left over: choose a number of calibration "
                        "windows instead of 'all'.")
    if n_windows < 1:
        raise DataError(f"Use at least one held-out window, got {n_windows}.")
    return replace(calibration, offset=calibration.offset + calibration.n_windows, n_windows=n_windows)


def _key(loaded: LoadedModel, plan: BitsOptimizerPlan, calibration: DataSpec) -> str:
    fields = {**asdict(plan), "budget": asdict(plan.budget)}
    if plan.granularity == "layer":
        del fields["granularity"]  # per-layer keys keep the shape they had before module granularity
    for name, default in (("imatrix", False), ("output_type", "auto"), ("runtime", DEFAULT_RUNTIME)):
        if fields[name] == default:
            del fields[name]  # keys of plans without them are what they were
    return OPTIMIZATIONS.key(fingerprint=loaded.fingerprint, plan=fields, data=calibration.to_dict())


def plan_costs(loaded: LoadedModel, plan: BitsOptimizerPlan) -> LayerCosts:
    """Storage of every layer and linear at the plan's levels (for a compressed-tensors runtime as its checkpoint
    packs them); for llama.cpp's types the rest of the model is counted as the GGUF file holds it
    (embedding/output in the output type, norms, metadata), so a budget in bytes is a budget on the file."""
    spec = plan.spec()
    costs = layer_costs(loaded.model, loaded.architecture, plan.levels, spec,
                        packed_zeros=runtime_named(plan.runtime).packs_zero_points)
    if spec.method != LLAMACPP:
        return costs
    lowest = tuple([min(plan.levels)] * loaded.num_layers)
    details = llamacpp_details(loaded, spec, lowest)
    if details["file_bytes"] is None:
        return costs
    return replace(costs, fixed_bytes=details["file_bytes"] - costs.total_bits(lowest) / 8)


def check_plan(loaded: LoadedModel, plan: BitsOptimizerPlan) -> int:
    """The budget in bits for the layers; refuses bad levels and budgets they cannot reach (nothing runs)."""
    if plan.candidates < 1 or plan.held_out_windows < 1:
        raise BudgetError("Check at least one solver candidate on at least one held-out window.")
    runs_as = plan.quant_plan()
    refusal = method_for(runs_as).refusal(loaded, runs_as)  # what its runs would refuse, refused before measuring
    if refusal:
        raise BudgetError(refusal)
    try:
        return plan.budget.layer_bits(plan_costs(loaded, plan))
    except QuantizationError as err:
        raise BudgetError(str(err)) from None


def optimization_if_cached(store: ResultsStore, loaded: LoadedModel, plan: BitsOptimizerPlan,
                           calibration: DataSpec) -> BitsOptimization | None:
    """A stored result for exactly these inputs, else None (nothing runs)."""
    payload = OPTIMIZATIONS.get(store, _key(loaded, plan, calibration))
    return None if payload is None else BitsOptimization.from_dict(payload)


LONG_SCAN_S = 600
"""A damage scan longer than this (seconds) gets a hint at the cheaper settings."""


def optimize_estimate(store: ResultsStore, loaded: LoadedModel, plan: BitsOptimizerPlan,
                      calibration: DataSpec) -> str:
    """Rough time of :func:`optimize_bits` now (cached measurements are free), for the button."""
    return scan_estimate(store, loaded, calibration, plan.actions(list(loaded.architecture.linears))).text()


def cheaper_settings(store: ResultsStore, loaded: LoadedModel, plan: BitsOptimizerPlan,
                     calibration: DataSpec) -> str | None:
    """When the scan would take more than :data:`LONG_SCAN_S`, a sentence on what costs less (a level per layer
    instead of per linear; fewer levels: each level is one scan of every unit), with estimates; else ``None``."""
    linears = list(loaded.architecture.linears)

    def cost(p: BitsOptimizerPlan) -> float:
        return scan_estimate(store, loaded, calibration, p.actions(linears)).seconds

    seconds = cost(plan)
    if seconds <= LONG_SCAN_S:
        return None
    options = [f"each allowed level costs about {describe_seconds(seconds / len(plan.levels))} of it"]
    if plan.granularity == "module":
        options.insert(0, f"a level per layer takes {describe_seconds(cost(replace(plan, granularity='layer')))}")
    return (f"This scan takes {describe_seconds(seconds)} (once: it is cached). Cheaper: " + "; ".join(options)
            + "; fewer calibration windows cost less in proportion.")


@explain_out_of_memory("Optimizing for the budget")
def optimize_bits(store: ResultsStore, loaded: LoadedModel, plan: BitsOptimizerPlan, calibration: DataSpec, *,
                  progress: StageProgress | None = None, should_stop: StopCheck | None = None) -> BitsOptimization:
    """Measure, solve, check on held-out windows; the result is cached (see the module docstring).

    Bad input (levels, budget, data) is refused before anything runs, with the feasible range named.
    """
    cached = optimization_if_cached(store, loaded, plan, calibration)
    if cached is not None:
        return cached
    start = time.perf_counter()
    budget_bits = check_plan(loaded, plan)  # bad input refused before anything runs
    spec = plan.spec()
    costs = plan_costs(loaded, plan)
    held_out = token_windows(held_out_spec(calibration, plan.held_out_windows), loaded.tokenizer, loaded.max_seqlen)
    if held_out.n_windows < 1:
        raise DataError("No calibration text is left for the held-out check: use fewer calibration windows.")

    linears = list(loaded.architecture.linears)
    matrix = measure_sensitivity(store, loaded, calibration, plan.actions(linears), progress=progress,
                                 should_stop=should_stop)
    damage = unit_damage(matrix.damages, costs, plan.granularity, linears)
    # the solver sums what the choice is judged by: KL divergence for llama.cpp's types, else the blended damage
    units, values = costs.units(plan.granularity), damage["kl" if plan.judged_by == "kld" else "blended"]
    if plan.tied:  # the runtime loads q/k/v and gate/up as one module each: one level per fused group
        units, values = tie_units(units, fused_groups(linears, loaded.architecture.linears), values)
    solve_start = time.perf_counter()
    solution = solve([costs.unit_bits(u) for u in units], [values[u] for u in units], budget_bits, k=plan.candidates)
    solve_seconds = time.perf_counter() - solve_start

    proposals = {f"optimizer #{n}": allocation_from_units(units, [costs.levels[j] for j in s.choice], loaded.num_layers)
                 for n, s in enumerate(solution.selections, 1)}
    proposals.update(competitors(store, loaded, calibration, costs, budget_bits, progress))
    if plan.quantizer == LLAMACPP and plan.runtime in (DEFAULT_RUNTIME, "llama.cpp"):
        proposals.update(presets_that_fit(loaded, costs, budget_bits))  # never worse than a preset that fits
    candidates: list[Candidate] = []
    for name, bits in proposals.items():
        same = next((c for c in candidates if c.bits == bits), None)
        if same is not None:
            same.also.append(name)
            continue
        candidates.append(Candidate(
            name=name, source="optimizer" if name.startswith("optimizer") else "preset" if name.startswith(
                "llama.cpp") else ("uniform" if name == "uniform" else "ordering"), bits=list(bits),
            avg_bits=costs.avg_bits(bits), model_bytes=costs.model_bytes(bits),
            predicted_kl=summed_damage(bits, damage["kl"], costs),
            predicted_dnll=summed_damage(bits, damage["dnll"], costs),
            predicted_damage=summed_damage(bits, damage["blended"], costs)))

    calibration_windows = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen)
    reference = DenseReference.empty(held_out.n_windows * (held_out.seqlen - 1))
    dense = perplexity(loaded.model, held_out, observer=reference.observe)
    for n, candidate in enumerate(candidates, 1):
        if should_stop is not None and should_stop():
            raise ScanCancelled("Optimization cancelled; nothing was stored.")
        step = stage_callback(progress, f"checking {candidate.name} ({n}/{len(candidates)})")
        quantized = quantize_model(loaded, candidate.bits,
                                   calibration_windows if spec.needs_calibration else None, spec=spec,
                                   progress=step)
        meter = DivergenceMeter(reference)
        result = perplexity(quantized.model, held_out, observer=meter.observe)
        del quantized
        candidate.measured_ppl, candidate.measured_dnll = result.ppl, result.mean_nll - dense.mean_nll
        candidate.measured_kld = meter.result().mean
    chosen = min(range(len(candidates)), key=lambda i: (plan.measured(candidates[i]), i))
    outcome = BitsOptimization(plan, candidates, chosen, dense.ppl, matrix.data_label, held_out.label(),
                               budget_bits, solution.exact, solve_seconds, time.perf_counter() - start)
    OPTIMIZATIONS.put(store, _key(loaded, plan, calibration), outcome.to_dict())
    return outcome
