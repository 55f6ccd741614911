"""What every compression method provides to the one runner (:func:`engine.runs.runner.run`).

A method turns a *plan* (a frozen dataclass of what the user set, :mod:`engine.runs.plans`) into a compressed
copy of the loaded model.  It is one module in :mod:`engine.methods` with one :class:`Method` subclass and one
line in the registry (``engine/methods/__init__.py``).  The runner owns everything that is the same for every
method: the memory check, timing, evaluation against dense on the same windows, the stored record; pages, the
CLI, sweeps, exports and the estimates ask the registry instead of branching on method names.

The steps, in the order the runner calls them:

1. ``refusal(loaded, plan, saving)``: why this run cannot start on this model (``None`` when it can);
2. ``memory_profile(plan)`` / ``code_bits(plan, prepared)``: what :func:`engine.core.memory.plan_memory` plans;
3. ``prepare(...)``: the per-layer choice the pages preview (a slicing schedule, a bit allocation, the layers
   to drop); computed from scores when the plan says so;
4. ``compress(...)``: a :class:`Compressed` copy (the base model is never modified);
5. ``save(...)``: optional, a folder that reloads the compressed model.

Exports call ``rebuild`` (the model a stored run evaluated, from its record) and ``export_formats``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from engine.core.data import DataSpec
from engine.core.memory import MemoryProfile
from engine.core.models import LoadedModel
from engine.core.progress import StageProgress
from engine.export.hf_folder import ExportError
from engine.quant.grid import QuantizerSpec
from engine.quant.runtimes import Runtime
from engine.runs.record import RunRecord
from engine.runs.store import ResultsStore

FORMATS = {
    "hf": "Hugging Face folder (transformers from_pretrained)",
    "gguf": "GGUF file (llama.cpp; transformers' GGUF loader)",
    "ct": "compressed-tensors folder (vLLM on a GPU; transformers from_pretrained for the symmetric grid)",
}
"""Export formats (:mod:`engine.runs.exports` writes them), with what loads each."""


NOT_QUANTIZED = {"gguf": "GGUF export is for quantized runs (a tensor type per layer).",
                 "ct": "compressed-tensors export is for quantized runs."}
"""Why a run without quantized weights has no GGUF / compressed-tensors export."""
REMOTE_CODE = "transformers + LayerLab's modelling file"
"""Where a model with other widths or blocks than its family's runs (:meth:`Method.runs_in`)."""


def calibration_of(record: RunRecord) -> DataSpec:
    """The calibration data a stored run was compressed with (what ``rebuild`` needs)."""
    spec = record.config.get("calibration_spec")
    if not spec:
        raise ExportError(f"Run {record.id} was stored before runs recorded their calibration data, so its model "
                          "cannot be rebuilt: run the same settings again and export the new run.")
    return DataSpec(**spec)


@dataclass(frozen=True)
class RunCost:
    """What a run costs besides evaluation, for :func:`engine.runs.runner.estimate_run_seconds`.

    ``passes``: passes of the decoder layers over the calibration tokens (cost that grows with the text; the
    output head is not run on them); ``fixed_per_hidden``:
    decoder-token equivalents per unit of hidden size (per-layer work that does not: eigendecompositions,
    GPTQ's column loops, quantizing every weight).  Both in decoder-layer units (a full forward of SmolLM2 is
    0.79 of them, of Gemma-3-270M 0.37: the rest is the output head), fitted to measured runs by
    ``bench/estimates.py``.
    """

    passes: float
    fixed_per_hidden: float


@dataclass
class Compressed:
    """A compressed copy: the torch ``model`` to evaluate, ``size`` metrics against dense (bytes, params,
    fractions), the run's ``config`` (stored with the record; enough for ``rebuild``), and ``artifact``:
    what ``save`` writes (a slicing result, a :class:`~engine.quant.quantize_model.QuantizedModel`, ...)."""

    model: torch.nn.Module
    size: dict
    config: dict
    artifact: Any = None


class Method:
    """One compression method.  Subclasses set the class attributes and implement the steps they support."""

    name: ClassVar[str]
    """Stored as the run's method (records, filters, chart series)."""
    plan_type: ClassVar[type]
    title: ClassVar[str]
    """In sentences: ``The {title} run ran out of memory``."""
    folder: ClassVar[str]
    """``cache/<folder>/`` holds saved models of this method."""
    series_word: ClassVar[str] = ""
    """The word its series labels start with when not the name (``drop layers by lr``): a legend then needs no
    ``method, `` prefix."""
    measures_latency: ClassVar[bool] = False
    """The compressed model has other shapes than dense: the runner times both (quantized runs keep dense's)."""
    rebuild_share: ClassVar[float] = 1.0
    """Rebuilding a stored run's model for an export takes this share of its compression time."""
    keeps_layers: ClassVar[bool] = True
    """Every decoder layer survives (so scores of the dense model still rank the compressed one's layers)."""

    # -------------------------------------------------------------- before the run

    def refusal(self, loaded: LoadedModel, plan, saving: bool = False) -> str | None:
        """Why this plan cannot run on ``loaded`` (or be saved, when ``saving``); ``None`` when it can."""
        return None

    def cost(self, plan) -> RunCost:
        raise NotImplementedError

    def extra_eval_seconds(self, loaded: LoadedModel, plan, seqlen: int, n_windows: int) -> float:
        """Seconds the compressed model's evaluation over ``n_windows`` windows of ``seqlen`` tokens takes beyond
        the dense model's forward passes (a model that computes differently, e.g. in llama.cpp's types)."""
        return 0.0

    def cached_passes(self, store: ResultsStore, loaded: LoadedModel, plan, calibration: DataSpec) -> float:
        """Calibration passes counted in :meth:`cost` whose results the store already holds (time estimates);
        nothing is computed."""
        return 0.0

    def memory_profile(self, plan) -> MemoryProfile:
        """What the run holds while it builds and evaluates."""
        raise NotImplementedError

    def reads_calibration(self, plan) -> bool:
        """Whether compressing reads the calibration windows (their tokens count in the memory plan)."""
        return False

    def code_bits(self, plan, prepared=None) -> int:
        """The widest code a quantized variant holds (memory plans); 8 for methods without codes."""
        return 8

    def group_size(self, plan) -> int | None:
        return 128

    # -------------------------------------------------------------- the run

    def prepare(self, store: ResultsStore, loaded: LoadedModel, plan, calibration: DataSpec,
                progress: StageProgress | None = None, compute: bool = True):
        """The per-layer choice the run applies (what pages preview).  ``compute=False``: raise
        :class:`~engine.runs.cached_scores.ScoresNotComputed` instead of computing scores."""
        return None

    def compress(self, store: ResultsStore, loaded: LoadedModel, plan, prepared, calibration: DataSpec,
                 progress: StageProgress | None = None) -> Compressed:
        raise NotImplementedError

    def save(self, compressed: Compressed, folder: str | Path, tokenizer=None) -> Path:
        raise ValueError(f"{self.title.capitalize()} runs cannot be saved as a model folder.")

    # -------------------------------------------------------------- after the run

    def rebuild(self, loaded: LoadedModel, record: RunRecord, progress: StageProgress | None = None):
        """The model ``record`` evaluated, rebuilt from its config."""
        raise ExportError(f"Run {record.id} ({record.method}) has no model to export.")

    def quantized_as(self, record: RunRecord) -> tuple[QuantizerSpec, tuple] | None:
        """The quantizer and per-layer bits (:mod:`engine.quant.layer_bits`) of ``record``'s model; ``None``
        when its weights are not quantized."""
        return None

    def runs_in(self, config: dict) -> str:
        """Where the model of a run stored with ``config`` runs as it is (short, for tables and the report)."""
        return ""

    def rebuild_seconds(self, record: RunRecord) -> float:
        """Rough seconds to rebuild ``record``'s model for an export: :attr:`rebuild_share` of its compression."""
        return float(record.metrics.get("compress_s", 0.0)) * self.rebuild_share

    def written_from(self, loaded: LoadedModel, record: RunRecord) -> LoadedModel:
        """The model whose config, tokenizer and layer count an export of ``record``'s model is written with."""
        return loaded

    def deployment(self, plan, runtime: Runtime) -> str | None:
        """Where a model from ``plan`` runs as it is, said for a user who deploys with ``runtime`` (``None``: no
        more to say than the runtime's own choices; quantization narrows its choices to the runtime instead)."""
        return None

    def export_formats(self, record: RunRecord, loaded: LoadedModel | None = None) -> dict[str, str | None]:
        """Format -> ``None`` if ``record``'s model exports that way, else why not."""
        reason = f"{self.title.capitalize()} runs have nothing to export beyond the base model."
        return dict.fromkeys(FORMATS, reason)
