"""Target runtimes: where a quantized model will run, and what each one accepts as it is.

A user picks the runtime once (the sidebar, ``--runtime`` on the CLI); every place that chooses bits offers
only what that runtime runs, and a run records its runtime:

- ``llama.cpp`` (GGUF): llama.cpp's own types (:mod:`engine.quant.ggml_types`), exported bit for bit;
- ``vllm`` (compressed-tensors): ``CompressedTensorsWNA16``'s rules (:mod:`engine.export.vllm_rules`, read in
  vllm-project/vllm): 4- and 8-bit integer weights; 4-bit ones with a zero point per group (LayerLab's integer
  grid, vLLM's ``uint4``, which Marlin runs; the default: a third less KL than the symmetric grid at 4 bits on
  SmolLM2 for 0.06 bits per weight more) or symmetric, 8-bit ones symmetric (``uint8b128``: the scheme table
  also lists ``uint8`` with zero points, but Marlin's zero-point kernels take ``uint4`` only), group-wise or
  per-row scales, act-order only with static groups, and q/k/v and gate/up at one level each (vLLM fuses them
  into ``qkv_proj`` / ``gate_up_proj``; a checkpoint whose fused parts differ does not load);
- ``transformers`` (compressed-tensors, dequantized on load): any level from 2 to 8 on the symmetric grid
  (transformers 5.23 cannot load compressed-tensors zero points: :mod:`engine.export.ct_folder`);
- ``research``: LayerLab's free grid (any level, group size, zero point): for exploring, not deployable as is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from engine.quant.grid import LLAMACPP, MAX_BITS, MIN_BITS, ZERO_POINT_LABELS, ZERO_POINTS, zero_point_at

FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
"""vLLM's fused modules and the checkpoint linears each one loads."""
ALL_LEVELS = tuple(range(MIN_BITS, MAX_BITS + 1))
GROUP_SIZES = (32, 64, 128, 256)


class RuntimeMismatch(ValueError):
    """A choice the target runtime does not run; the message names what it does run."""


@dataclass(frozen=True)
class Runtime:
    """What one runtime runs: quantizers, bit levels, zero points, group sizes (``None``: one scale per row),
    act-order, whether fused linears share a level, and the export format it loads."""

    key: str
    label: str
    quantizers: tuple[str, ...]
    levels: tuple[int, ...]
    zero_points: tuple[str, ...]
    group_sizes: tuple[int | None, ...]
    act_order: bool
    fused: bool
    export: str | None
    deployable: bool = True
    dynamic_groups: bool = False  # act-order GPTQ with a per-column group index (g_idx)
    zero_point_bits: tuple[int, ...] | None = None  # widths its kernels take zero points at (None: every width)

    def zero_point_widths(self, zero_point: str) -> tuple[int, ...] | None:
        """``QuantizerSpec.zero_point_bits`` for a plan on ``zero_point``: the widths that keep it here (vLLM: 4;
        8-bit weights then go on the symmetric grid)."""
        return None if zero_point == "symmetric" else self.zero_point_bits

    def zero_point_at(self, bits: int, zero_point: str | None = None) -> str:
        """The grid ``bits``-bit weights go on here (``zero_point``: a plan's, else :attr:`default_zero_point`)."""
        zero_point = zero_point or self.default_zero_point
        return zero_point_at(bits, zero_point, self.zero_point_widths(zero_point))

    @property
    def default_zero_point(self) -> str:
        """The grid's zero point where a plan does not choose: the integer one unless the runtime takes only
        another (transformers: symmetric)."""
        return "integer" if "integer" in self.zero_points else self.zero_points[0]

    @property
    def packs_zero_points(self) -> bool:
        """Whether its files hold integer zero points at the code width (a compressed-tensors checkpoint), not as
        fp16 numbers (LayerLab's own files): the sizes shown and the budgets solved count them so."""
        return self.export == "ct"

    @property
    def runs_as(self) -> str:
        """Where a model quantized for this runtime runs as it is, for tables and the report."""
        return self.label if self.deployable else f"{self.label} (not deployable as is)"

    def summary(self) -> str:
        """One line for captions: what this runtime takes."""
        if not self.deployable:
            return f"{self.label}: any level, group size and zero point; not deployable as is."
        parts = [f"levels {', '.join(map(str, self.levels))}"]
        if self.quantizers != (LLAMACPP,):
            parts.append(f"zero point {'/'.join(self.zero_points)}")
        if self.fused:
            parts.append("q/k/v and gate/up at one level each")
        return f"{self.label}: " + "; ".join(parts) + "."

    def problems(self, quantizer: str, levels: Sequence[int], group_size: int | None = None,
                 zero_point: str = "symmetric", act_order: bool = False, dynamic_groups: bool = False,
                 module_levels: Sequence[Mapping[str, int]] = ()) -> list[str]:
        """Every choice this runtime does not run, in words (empty: it runs as chosen).

        ``module_levels``: per-linear levels of layers that have them (checked against the fused groups).
        """
        found = []
        if quantizer not in self.quantizers:
            found.append(f"the {quantizer} quantizer (it takes {' or '.join(self.quantizers)})")
        wrong = sorted({int(b) for b in levels} - set(self.levels)) if self.deployable else []  # research: any
        if wrong:
            found.append(f"{', '.join(map(str, wrong))}-bit weights (it takes {', '.join(map(str, self.levels))})")
        if quantizer != LLAMACPP:
            if zero_point not in self.zero_points:
                found.append(f"zero point '{zero_point}' (it takes {' or '.join(self.zero_points)})")
            if group_size not in self.group_sizes:
                found.append(f"group size {group_size or 'per row'} (it takes "
                             f"{', '.join(str(g or 'per row') for g in self.group_sizes)})")
            if act_order and not self.act_order:
                found.append("act-order (it takes none)")
            elif act_order and dynamic_groups and not self.dynamic_groups:
                found.append("act-order with dynamic groups (it takes static groups only)")
        if self.fused:
            for entry in module_levels:
                split = [group for group in fused_groups(list(entry)) if len({entry[n] for n in group}) > 1]
                if split:
                    found.append(f"{'/'.join(split[0])} at different levels (vLLM loads them as one module)")
                    break
        return found

    def refusal(self, problems: Sequence[str]) -> str:
        """One message for a user: what this runtime does not run (:meth:`problems`), and what to do."""
        return (f"{self.label} does not run " + "; ".join(problems) + ". Change those settings, or choose another "
                "target runtime (sidebar; --runtime on the CLI).")


RUNTIMES: dict[str, Runtime] = {r.key: r for r in (
    Runtime("research", "LayerLab research grid", ("rtn", "gptq", LLAMACPP), ALL_LEVELS, ZERO_POINTS,
            (None, *GROUP_SIZES), act_order=True, fused=False, export=None, deployable=False, dynamic_groups=True),
    Runtime("llama.cpp", "llama.cpp (GGUF)", (LLAMACPP,), (2, 3, 4, 5, 6, 8), ZERO_POINTS, (None,),
            act_order=False, fused=False, export="gguf"),
    Runtime("vllm", "vLLM (compressed-tensors)", ("rtn", "gptq"), (4, 8), ("integer", "symmetric"),
            (None, 32, 64, 128), act_order=True, fused=True, export="ct", zero_point_bits=(4,)),
    Runtime("transformers", "transformers (compressed-tensors)", ("rtn", "gptq"), ALL_LEVELS, ("symmetric",),
            (None, *GROUP_SIZES), act_order=True, fused=False, export="ct"),
)}
DEFAULT_RUNTIME = "research"


def grid_label(quantizer: str | None, zero_point: str | None, runtime: str | None) -> str:
    """What a quantization run's series says of its grid: ``", symmetric"``, ``", float zero"`` or
    ``", integer zero"`` where ``zero_point`` is not ``runtime``'s default (llama.cpp's types: nothing)."""
    if quantizer in (None, LLAMACPP) or zero_point is None:
        return ""
    if zero_point == RUNTIMES.get(runtime or DEFAULT_RUNTIME, RUNTIMES[DEFAULT_RUNTIME]).default_zero_point:
        return ""
    return ZERO_POINT_LABELS[zero_point]


def runtime_named(key: str) -> Runtime:
    """The runtime ``key`` (refused with the choices when unknown)."""
    if key not in RUNTIMES:
        raise RuntimeMismatch(f"Unknown target runtime '{key}': choose one of {', '.join(RUNTIMES)}.")
    return RUNTIMES[key]


def runtime_of(config: Mapping) -> Runtime:
    """The runtime a stored run was made for (``config["target_runtime"]``); runs stored before runs recorded
    one, or under a key this version lacks, read as the research grid (never an error on a stored run)."""
    return RUNTIMES.get(config.get("target_runtime") or DEFAULT_RUNTIME, RUNTIMES[DEFAULT_RUNTIME])


def fused_groups(linears: Sequence[str], paths: Mapping[str, str] | None = None) -> list[tuple[str, ...]]:
    """The groups of ``linears`` (short names, e.g. ``q``) that vLLM fuses into one module, in layer order.

    ``paths``: short name -> module path (the architecture's ``linears``); without it a short name is matched
    as ``<name>_proj``.  Only complete groups count (q, k and v all present).
    """
    leaf = {name: (paths[name] if paths else f"{name}_proj").rpartition(".") for name in linears}
    groups = []
    for parts in FUSED.values():
        by_parent: dict[str, list[str]] = {}
        for name in linears:
            parent, _, last = leaf[name]
            if last in parts:
                by_parent.setdefault(parent, []).append(name)
        groups += [tuple(names) for names in by_parent.values() if len(names) == len(parts)]
    return groups
