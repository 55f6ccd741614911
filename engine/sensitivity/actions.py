"""What can be done to one decoder layer: quantize, slice, drop it, drop its attention or its MLP.

An :class:`Action` is a frozen value with a stable ``key`` (cache keys, CSV
columns, CLI) and a human ``label`` (charts).  Text forms, as the CLI takes
them (comma-separated in ``--actions``):

==================  ==============================================================
``quant:3``         round-to-nearest (RTN) at 3 bits (same as ``rtn:3``)
``gptq:3``          GPTQ at 3 bits (static act-order, Hessians from the dense layer's inputs)
``quant:3@down``    only one linear of the layer (its short name, e.g. q, k, v, o, gate, up, down)
``quant:Q3_K``      llama.cpp's Q3_K (its own quantizer; also ``llama.cpp:3``), with llama.cpp's fallback
                    type for rows that are not a multiple of 256
``slice:0.25``      slice 25% of the layer's residual width (SliceGPT on this layer only)
``drop``            remove the layer (its output is its input)
``drop-attn``       remove only its attention block
``drop-mlp``        remove only its MLP block
==================  ==============================================================

Bits are integers in ``MIN_BITS..MAX_BITS`` (2-8); quantization is group-wise
(``group_size`` input columns per scale, 128 by default) with integer zero
points, the grid of :mod:`engine.quant.grid`.  A slicing fraction ``f`` keeps
``d = D·(1 − f)`` residual dimensions rounded to a multiple of
``SLICE_ROUND_TO`` (the Slicing page's default rounding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engine.core.architectures import Architecture, Feature
from engine.quant.ggml_types import TYPE_SETS
from engine.quant.grid import LLAMACPP, MAX_BITS, MIN_BITS, QuantizationError, QuantizerSpec
from engine.sensitivity.errors import ActionSpecError, UnsupportedActionError
from engine.slicing.schedules import DEFAULT_ROUND_TO, round_dim

QUANT_KINDS = ("rtn", "gptq", LLAMACPP)
DROP_KINDS = ("drop", "drop-attn", "drop-mlp")
KINDS = (*QUANT_KINDS, "slice", *DROP_KINDS)
SLICE_ROUND_TO = DEFAULT_ROUND_TO
DEFAULT_GROUP_SIZE = 128
_DROP_LABELS = {"drop": "drop layer", "drop-attn": "drop attention", "drop-mlp": "drop MLP"}


@dataclass(frozen=True)
class Action:
    """One thing done to one layer.

    ``kind``: one of :data:`KINDS`.  ``bits`` (quantization only): code width.
    ``group_size`` (quantization only): input columns per scale (``None`` = one per row).
    ``fraction`` (slicing only): share of the residual width removed, in (0, 1).
    ``module`` (quantization only): quantize only this linear of the layer (its short name in the
    architecture table, e.g. ``down``); ``None``: every linear of the layer.
    ``zero_point`` (RTN / GPTQ only): the grid's zero point (:data:`engine.quant.grid.ZERO_POINTS`; ``None``:
    the quantizer's default, an integer zero point).
    """

    kind: str
    bits: int | None = None
    fraction: float | None = None
    group_size: int | None = None
    module: str | None = None
    zero_point: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ActionSpecError(f"Unknown action '{self.kind}'. Choose one of: {', '.join(KINDS)} "
                                  "(e.g. quant:3, gptq:3, slice:0.25, drop, drop-attn, drop-mlp).")
        if self.kind in QUANT_KINDS:
            bits = self.bits
            if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
                raise ActionSpecError(f"Bit level {bits!r} is out of range: choose an integer from {MIN_BITS} "
                                      f"to {MAX_BITS} (e.g. quant:3).")
            if self.group_size is None and self.kind != LLAMACPP:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            self.quantizer()  # validates the group size with the quantizer's own message
        elif self.bits is not None:
            raise ActionSpecError(f"'{self.kind}' takes no bit level; bits belong to quant:/gptq: actions.")
        if self.kind == "slice":
            fraction = self.fraction
            if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction < 1.0:
                raise ActionSpecError(f"Slicing fraction {fraction!r} is out of range: give the share of the "
                                      "residual width to remove, between 0 and 1 (e.g. slice:0.25).")
            object.__setattr__(self, "fraction", float(fraction))
        elif self.fraction is not None:
            raise ActionSpecError(f"'{self.kind}' takes no fraction; fractions belong to slice: actions.")
        if self.module is not None and (self.kind not in QUANT_KINDS or not isinstance(self.module, str)
                                        or not self.module.strip()):
            raise ActionSpecError(f"'{self.kind}' takes no module: a module (e.g. quant:3@down) belongs to "
                                  "quant:/gptq: actions.")

    @property
    def key(self) -> str:
        """Stable short name: ``rtn3-g128``, ``gptq3-g128``, ``slice0.25``, ``drop``, ``drop-attn``, ``drop-mlp``."""
        if self.kind == LLAMACPP:
            return f"ggml-{self.ggml_type}" + (f"-{self.module}" if self.module else "")
        if self.kind in QUANT_KINDS:
            group = "row" if self.group_size is None else self.group_size
            zero = "" if self.zero_point is None else f"-z{self.zero_point}"
            return f"{self.kind}{self.bits}-g{group}{zero}" + (f"-{self.module}" if self.module else "")
        if self.kind == "slice":
            return f"slice{self.fraction:g}"
        return self.kind

    @property
    def label(self) -> str:
        """Chart label: ``RTN 3-bit``, ``GPTQ 3-bit``, ``Q3_K``, ``slice 25%``, ``drop layer``..."""
        if self.kind == LLAMACPP:
            return self.ggml_type + (f" {self.module}" if self.module else "")
        if self.kind in QUANT_KINDS:
            group = "" if self.group_size == DEFAULT_GROUP_SIZE else f" g{self.group_size or 'row'}"
            zero = "" if self.zero_point is None else f" {self.zero_point}"
            return f"{self.kind.upper()} {self.bits}-bit{group}{zero}" + (f" {self.module}" if self.module else "")
        if self.kind == "slice":
            return f"slice {100 * self.fraction:g}%"
        return _DROP_LABELS[self.kind]

    @property
    def cost_word(self) -> str:
        """How findings name this action's cost: ``3-bit RTN``, ``25% slicing``, ``dropping the layer``..."""
        if self.kind == LLAMACPP:
            return f"llama.cpp's {self.ggml_type}" + (f" of {self.module}" if self.module else "")
        if self.kind in QUANT_KINDS:
            return f"{self.bits}-bit {self.kind.upper()}" + (f" of {self.module}" if self.module else "")
        if self.kind == "slice":
            return f"{100 * self.fraction:g}% slicing"
        return {"drop": "layer-drop", "drop-attn": "attention-drop", "drop-mlp": "MLP-drop"}[self.kind]

    @property
    def ggml_type(self) -> str:
        """llama.cpp's k-quant type of a ``llama.cpp`` action's level (before the fallback for narrow rows)."""
        return TYPE_SETS["k-quants"].get(self.bits, f"{self.bits}-bit")

    def quantizer(self) -> QuantizerSpec:
        """The per-weight quantizer (GPTQ: static act-order, calibrated on the dense layer's own inputs)."""
        if self.kind == LLAMACPP:
            if self.group_size is not None:
                raise ActionSpecError("llama.cpp's types fix their own blocks: give no group size.")
            try:
                return QuantizerSpec(method=LLAMACPP, bits=self.bits)
            except QuantizationError as err:
                raise ActionSpecError(str(err)) from None
        try:
            return QuantizerSpec(method=self.kind, bits=self.bits, group_size=self.group_size,
                                 act_order=self.kind == "gptq", propagation="dense",
                                 **({} if self.zero_point is None else {"zero_point": self.zero_point}))
        except QuantizationError as err:
            raise ActionSpecError(str(err)) from None

    def kept_dims(self, hidden_size: int) -> int:
        """Residual dimensions a slicing action keeps (of ``hidden_size``); refuses a no-op or an empty layer."""
        kept = round_dim(hidden_size * (1.0 - self.fraction), SLICE_ROUND_TO, hidden_size)
        if kept >= hidden_size or kept <= 0:
            raise ActionSpecError(
                f"Slicing {100 * self.fraction:g}% of {hidden_size} dimensions keeps {kept} after rounding to a "
                f"multiple of {SLICE_ROUND_TO}: {'nothing is removed' if kept >= hidden_size else 'nothing is left'}. "
                "Pick a fraction between "
                f"{SLICE_ROUND_TO / hidden_size:.2f} and {1 - SLICE_ROUND_TO / hidden_size:.2f}.")
        return kept

    def to_dict(self) -> dict:
        """The fields; ``module`` only when set (records of whole-layer actions read as before)."""
        return {k: v for k, v in asdict(self).items() if k != "module" or v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> Action:
        return cls(**data)


def parse_action(text: str) -> Action:
    """One action from its text form (see the module docstring); ``quant`` means RTN."""
    name, _, value = text.strip().partition(":")
    name = {"quant": "rtn", "quantize": "rtn", "drop-attention": "drop-attn"}.get(name.strip().lower(),
                                                                                  name.strip().lower())
    value = value.strip()
    if name == "ggml":
        name = LLAMACPP
    if name == "rtn" and value.upper().startswith("Q"):  # quant:Q3_K@down: llama.cpp's own type
        qtype, at, module = value.partition("@")
        levels = {t: b for b, t in TYPE_SETS["k-quants"].items()}
        if qtype.upper() not in levels or (at and not module.strip()):
            raise ActionSpecError(f"'{text}': llama.cpp actions name a k-quant type, one of {', '.join(levels)} "
                                  "(e.g. quant:Q3_K or quant:Q3_K@down).")
        return Action(LLAMACPP, bits=levels[qtype.upper()], module=module.strip() or None)
    if name in QUANT_KINDS:
        value, at, module = value.partition("@")
        bits, _, group = value.partition("/g")
        if not (bits.isdigit() and (not group or group.isdigit())) or (at and not module.strip()):
            raise ActionSpecError(f"'{text}' needs an integer bit level from {MIN_BITS} to {MAX_BITS}, e.g. "
                                  f"{name}:3 (or {name}:3/g64 for group size 64, {name}:3@down for one linear).")
        if name == LLAMACPP and group:
            raise ActionSpecError(f"'{text}': llama.cpp's types fix their own blocks; drop the /g part.")
        return Action(name, bits=int(bits), group_size=int(group) if group else None,
                      module=module.strip() or None)
    if name == "slice":
        try:
            fraction = float(value)
        except ValueError:
            raise ActionSpecError(f"'{text}' needs a slicing fraction between 0 and 1, e.g. slice:0.25.") from None
        return Action("slice", fraction=fraction)
    if value:
        raise ActionSpecError(f"'{text}': {name} takes no value (write just '{name}').")
    return Action(name)


def parse_actions(text: str) -> list[Action]:
    """Comma-separated actions, duplicates dropped, order kept; at least one."""
    actions = list(dict.fromkeys(parse_action(part) for part in text.split(",") if part.strip()))
    if not actions:
        raise ActionSpecError("No action given: name at least one, e.g. quant:3,slice:0.25,drop.")
    return actions


def check_supported(action: Action, architecture: Architecture, hidden_size: int) -> None:
    """Refuse actions this architecture cannot do, before any computation.

    Slicing relies on RMSNorm: the RMS of a projected signal equals SliceGPT's
    weightless norm of its kept coordinates (with the original width as the
    divisor), which does not hold for LayerNorm without centring.
    """
    if action.kind == "slice":
        if architecture.reason(Feature.SLICING) or architecture.parallel_blocks:
            raise UnsupportedActionError(
                f"{architecture.model_type} cannot be sliced: "
                f"{architecture.reason(Feature.SLICING) or 'parallel attention and MLP blocks (one norm)'}")
        if architecture.norm_kind != "rms":
            raise UnsupportedActionError(
                f"Slicing needs RMSNorm layers; {architecture.model_type} uses '{architecture.norm_kind}' norms, "
                "whose SliceGPT variant (centred embeddings) LayerLab does not implement. Measure quant:/drop "
                "actions on this model instead.")
        action.kept_dims(hidden_size)
    if action.module is not None and action.module not in architecture.linears:
        raise UnsupportedActionError(
            f"{architecture.model_type} layers have no linear '{action.module}': choose one of "
            f"{', '.join(architecture.linears)} (e.g. quant:3@{next(iter(architecture.linears))}).")
    if action.kind in ("drop-attn", "drop-mlp") and not (architecture.attention and architecture.mlp):
        raise UnsupportedActionError(
            f"{architecture.model_type} layers have no separate attention and MLP blocks to drop one of; "
            "measure 'drop' (the whole layer) instead.")
    block = {"drop-attn": "drop-attention", "drop-mlp": "drop-mlp"}.get(action.kind)
    reason = architecture.reason(block) or architecture.reason(Feature.SUBLAYER) if block else None
    if reason:
        raise UnsupportedActionError(f"{architecture.model_type} cannot {action.kind}: {reason}")
