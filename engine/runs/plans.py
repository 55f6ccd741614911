"""Plans: what a user sets with sliders or CLI flags, as frozen dataclasses.

A plan says *what* to do; :mod:`engine.runs.runner` turns it into a
schedule / allocation, compresses a copy, evaluates and stores it.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.data import DataSpec
from engine.quant.grid import QuantizerSpec
from engine.quant.layer_bits import all_levels
from engine.quant.runtimes import DEFAULT_RUNTIME, grid_label, runtime_named

SCHEDULES = ("dynamic", "constant", "custom")
ORDERINGS = ("lim", "zd", "random", "reversed-lim", "custom", "optimizer", "optimizer-module")
"""``optimizer``: bits chosen by :mod:`engine.runs.bits_optimizer` under a size budget (passed in as an allocation)."""
DEFAULT_EVAL_WINDOWS = 16
"""Evaluation windows every page and the CLI start from, so dense and compressed runs share windows."""
DEFAULT_EVAL_SEQLEN = 256
DEFAULT_CALIB_WINDOWS = 16
DEFAULT_CALIB_SEQLEN = 256
PREVIEW_WINDOWS = 4


@dataclass(frozen=True)
class EvalPlan:
    """What to measure on every model: perplexity data, zero-shot tasks; ``preview`` marks quick looks."""

    data: DataSpec
    tasks: tuple[str, ...] = ()
    task_limit: int | None = None
    batch_size: int = 4
    preview: bool = False


@dataclass(frozen=True)
class SlicingPlan:
    """Slicing settings: schedule kind, target SP, basis SB, custom fractions, rounding."""

    schedule: str = "dynamic"
    target: float = 0.25
    basis: float = 0.10
    fractions: tuple[float, ...] = ()
    round_to: int = 8
    final_rotation: bool = False

    def series(self) -> str:
        """Curve label on trade-off charts."""
        return f"dynamic SB={self.basis:g}" if self.schedule == "dynamic" else self.schedule

    def setting(self) -> str:
        """What tells this plan from the others of its series, in words: ``25% sliced``."""
        return f"{self.target:.0%} sliced"

    def name(self) -> str:
        """A file-name-safe name, e.g. ``dynamic_SB=0.1-0.25``."""
        return f"{self.series().replace(' ', '_')}-{self.target:g}"


@dataclass(frozen=True)
class QuantPlan:
    """Layer-wise quantization settings (docs/methods.md §4)."""

    quantizer: str = "rtn"
    group_size: int | None = 128
    high_bits: int = 4
    low_bits: int = 2
    low_fraction: float | None = 0.25
    target_bits: float | None = None
    ordering: str = "lim"
    custom_order: tuple[int, ...] = ()
    seed: int = 0
    zero_point: str = "integer"
    act_order: bool = False
    ggml_types: str = "k-quants"  # llama.cpp quantizer only: type set, imatrix, output type
    imatrix: bool = False
    output_type: str = "auto"
    runtime: str = DEFAULT_RUNTIME  # where the model will run (engine.quant.runtimes): what it may choose

    @property
    def top_bits(self) -> int:
        """The highest code width the plan allocates (what packed codes are sized by)."""
        return max(self.high_bits, self.low_bits)

    @property
    def quantizer_label(self) -> str:
        """``rtn``, ``gptq``, or ``llama.cpp k-quants[+imatrix]``."""
        if self.quantizer != "llama.cpp":
            return self.quantizer
        output = "" if self.output_type == "auto" else f", output {self.output_type}"
        return f"llama.cpp {self.ggml_types}{'+imatrix' if self.imatrix else ''}{output}"

    def series(self) -> str:
        """Curve label on trade-off charts (with the grid where it is not the runtime's default, and the target
        runtime unless it is the research grid): runs on different grids never share a curve."""
        quantizer = self.quantizer_label + grid_label(self.quantizer, self.zero_point, self.runtime)
        if self.ordering == "optimizer":
            label = f"optimizer {self.low_bits}-{self.high_bits}-bit {quantizer}"
        elif self.ordering == "optimizer-module":
            label = f"optimizer per linear {self.low_bits}-{self.high_bits}-bit {quantizer}"
        else:
            label = f"{self.ordering} {self.high_bits}/{self.low_bits}-bit {quantizer}"
        return label if self.runtime == DEFAULT_RUNTIME else f"{label} for {runtime_named(self.runtime).label}"

    def runtime_problems(self, bits=None) -> list[str]:
        """What the target runtime does not run in this plan (``bits``: the allocation, per layer or linear)."""
        levels = {self.high_bits, self.low_bits} if bits is None else set(all_levels(bits))
        modules = [] if bits is None else [b for b in bits if not isinstance(b, int)]
        spec = self.spec()
        return runtime_named(self.runtime).problems(
            self.quantizer, sorted(levels), self.group_size, self.zero_point, spec.act_order,
            spec.stores_group_index, modules)

    def setting(self) -> str:
        """What tells this plan from the others of its series: ``50% of layers at 3 bits`` or ``3.25 bits average``."""
        if self.target_bits is not None:
            return f"{self.target_bits:g} bits average"
        return f"{self.low_fraction or 0:.0%} of layers at {self.low_bits} bits"

    def name(self) -> str:
        share = f"{self.target_bits:g}avg" if self.target_bits is not None else f"{self.low_fraction or 0:g}low"
        return f"{self.series().replace(' ', '_').replace('/', '-')}-{share}"

    def spec(self) -> QuantizerSpec:
        """The underlying per-weight quantizer (at the high level)."""
        if self.quantizer == "llama.cpp":
            return QuantizerSpec(method=self.quantizer, bits=self.high_bits, ggml_types=self.ggml_types,
                                 imatrix=self.imatrix, output_type=self.output_type)
        return QuantizerSpec(method=self.quantizer, bits=self.high_bits, group_size=self.group_size,
                             zero_point=self.zero_point, act_order=self.act_order and self.quantizer == "gptq",
                             zero_point_bits=runtime_named(self.runtime).zero_point_widths(self.zero_point))


@dataclass(frozen=True)
class DropPlan:
    """Layer dropping (docs/methods.md §8): what to drop (``layer``, ``attention`` or ``mlp`` blocks), how many,
    ranked by what (``lr``, ``attention``, ``mlp`` cosine, measured ``sensitivity``, or a ``custom`` list),
    at once from the dense model's ranking or ``iterative``-ly (re-ranked after each drop)."""

    block: str = "layer"
    count: int = 4
    by: str = "lr"
    protect_ends: bool = True
    custom: tuple[int, ...] = ()
    iterative: bool = False

    @property
    def is_iterative(self) -> bool:
        """Iterative re-ranking applies to computed rankings only (a custom list is a list)."""
        return self.iterative and self.by != "custom" and self.count > 1

    def series(self) -> str:
        """Curve label on trade-off charts."""
        what = {"layer": "layers", "attention": "attention blocks", "mlp": "MLP blocks"}[self.block]
        return f"drop {what} by {self.by}" + (", iterative" if self.is_iterative else "")

    def setting(self) -> str:
        """What tells this plan from the others of its series: ``4 dropped``."""
        return f"{len(self.custom) if self.by == 'custom' else self.count} dropped"

    def choice(self) -> str:
        """How the layers were chosen, in words (stored with the run)."""
        if self.by == "custom":
            return "a custom list"
        if self.is_iterative:
            return f"iteratively: one at a time, re-ranked by {self.by} on the partly dropped model"
        return f"at once from the dense model's {self.by} ranking"

    def name(self) -> str:
        return f"drop-{self.block}-{self.by}-{self.count}" + ("-iter" if self.is_iterative else "")


@dataclass(frozen=True)
class StackPlan:
    """Compress twice: ``first`` slices or drops, ``then`` quantizes the result (docs/methods.md §8)."""

    first: SlicingPlan | DropPlan
    then: QuantPlan

    def series(self) -> str:
        return f"{self.first.series()} + {self.then.series()}"

    def setting(self) -> str:
        return f"{self.first.setting()}, then {self.then.setting()}"

    def name(self) -> str:
        return f"stack-{self.first.name()}-{self.then.name()}"
