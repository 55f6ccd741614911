"""The memory plan of a run on the loaded model, shown before it starts and checked when it starts.

``run_memory_plan`` turns a run's method, data and quantizer into an
:class:`engine.core.memory.MemoryPlan`; ``check_memory`` refuses a run that
would not fit (a :class:`RunDoesNotFit`, a ``ValueError``: pages and the CLI
show its message) before any work, so the base model and the store are left
as they were.
"""

from __future__ import annotations

from engine.core.data import DataSpec, token_windows
from engine.core.memory import MemoryPlan, ModelShape, evaluation_batch, plan_memory
from engine.core.models import LoadedModel
from engine.evaluation.perplexity import head_chunk
from engine.quant.quantized_linear import can_hold_codes
from engine.runs.plans import EvalPlan


class RunDoesNotFit(ValueError):
    """The run's memory plan exceeds the free memory; the message says what would make it fit."""


def run_memory_plan(loaded: LoadedModel, profile: str, calibration: DataSpec, evaluation: EvalPlan,
                    group_size: int | None = 128, code_bits: int = 8, *, reads_calibration: bool) -> MemoryPlan:
    """Memory plan of one run: ``profile`` is one of :data:`engine.core.memory.PROFILES` (a method says which:
    :func:`engine.runs.runner.run_memory`); calibration tokens count only where the method reads them
    (``reads_calibration``); ``code_bits``: the highest bit level of a quantization."""
    calib = token_windows(calibration, loaded.tokenizer, loaded.max_seqlen).input_ids.numel() \
        if reads_calibration else 0
    shape = ModelShape.of(loaded.model, loaded.architecture)
    seqlen = evaluation.data.seqlen
    return plan_memory(shape, profile, loaded.device, calib_tokens=calib,
                       eval_batch=evaluation_batch(shape, seqlen, evaluation.batch_size), eval_seqlen=seqlen,
                       group_size=group_size, code_bits=min(max(int(code_bits), 1), 8),
                       holds_codes=can_hold_codes(loaded.model, loaded.architecture),
                       head_chunk=head_chunk(loaded.model))


def check_memory(plan: MemoryPlan) -> None:
    """Raise :class:`RunDoesNotFit` when ``plan`` does not fit in the free memory."""
    refusal = plan.refusal()
    if refusal:
        raise RunDoesNotFit(refusal)
