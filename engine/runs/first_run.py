"""The guided first run of the Start page: one pass through the product on small data, each step in plain words.

On the loaded model, with 8 calibration and 8 evaluation windows of 128 tokens:

1. **baseline**: dense perplexity (every later run is compared with it on the same windows);
2. **scores**: Layer Redundancy (LR) and weight outliers (ZD), read out as findings;
3. **quantization**: 4/3-bit, half the layers at 3 bits, the least important by LIM first (RTN);
4. **slicing**: SliceGPT at 25% with the LR-dynamic schedule (skipped, with the reason, where the model cannot
   be sliced);
5. **dropping**: the 2 layers with the highest LR (first and last protected).

Each step returns one sentence of what it found; the runs are stored like any other (the Results page and
the trade-off charts show them), once: a second guided run on the same model shows the runs the first stored.
:func:`first_run_seconds` is the estimate the button shows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

from engine.core.data import DataSpec
from engine.core.keys import StoredKind
from engine.core.models import LoadedModel
from engine.core.progress import StageProgress
from engine.methods import method_for
from engine.runs.cached_scores import compute_scores, scores_if_cached
from engine.runs.plans import DropPlan, EvalPlan, QuantPlan, SlicingPlan
from engine.runs.record import RunRecord
from engine.runs.runner import (
    ensure_dense,
    estimate_run_seconds,
    evaluation_seconds,
    find_dense,
    run,
    scoring_seconds,
)
from engine.runs.store import ResultsStore
from engine.runs.summary import change_text
from engine.scores.findings import redundancy_findings

CALIBRATION = DataSpec(split="calibration", seqlen=128, n_windows=8)
EVALUATION = EvalPlan(DataSpec(split="evaluation", seqlen=128, n_windows=8))
QUANTIZATION = QuantPlan("rtn", 128, 4, 3, 0.5, ordering="lim")
SLICING = SlicingPlan("dynamic", 0.25, 0.10)
DROPPING = DropPlan("layer", 2, "lr")
METHOD_STEPS = ((QUANTIZATION, "4/3 bits, the less important half of the layers at 3 bits"),
                (SLICING, "SliceGPT, 25% of the width on average, LR-dynamic schedule"),
                (DROPPING, "the 2 most redundant layers by LR"))
"""The guided run's compressions, in order, with what each does in words (skipped where the model cannot)."""


@dataclass(frozen=True)
class Step:
    """One step: a ``title``, what it does in words, its estimated seconds, and ``run(progress) -> finding``."""

    key: str
    title: str
    what: str
    seconds: float
    run: Callable[[StageProgress | None], str]


def run_sentence(record: RunRecord) -> str:
    """One sentence of a stored run against dense: perplexity and change, size, KL divergence (speed, a noisy
    measurement on a busy CPU, is on the Results page)."""
    m = record.metrics
    parts = [f"perplexity {m['ppl']:.1f}, {change_text(m)}", f"{m['size_fraction']:.0%} of dense's 16-bit bytes"]
    if m.get("kld_mean") is not None:
        parts.append(f"KL divergence to dense {m['kld_mean']:.3f}, same top token as dense {m['same_top']:.0%}")
    sentence = f"{record.series}: " + "; ".join(parts) + "."
    if m.get("unquantized_fraction", 0) > 0.3:  # recorded by runs that quantize
        sentence += (f" Its size stays high because the tensors left at 16 bits (embedding, output head, norms) are "
                     f"{m['unquantized_fraction']:.0%} of this model's parameters.")
    if m.get("param_fraction", 0) > 1.0:
        sentence += (" The sliced model is bigger than dense: SliceGPT adds a small matrix at every residual "
                     "connection and unties the embeddings, which a model this small does not win back. Slicing "
                     "pays off on wider models; here quantization or dropping shrink it.")
    return sentence


def first_run_steps(store: ResultsStore, loaded: LoadedModel) -> list[Step]:
    """The steps of the guided run for ``loaded`` (slicing only where the model supports it)."""

    def baseline(progress: StageProgress | None) -> str:
        dense = ensure_dense(store, loaded, EVALUATION, progress)
        return (f"Dense perplexity {dense.metrics['ppl']:.2f} on {dense.data_label}: every run below is compared "
                "with it on these same windows.")

    def scores(progress: StageProgress | None) -> str:
        lr, zd, _hit = compute_scores(store, loaded, CALIBRATION, progress=progress)
        return " ".join(redundancy_findings(lr, zd)[:2])

    dense_s = 0.0 if find_dense(store, loaded, EVALUATION) is not None else evaluation_seconds(loaded,
                                                                                            EVALUATION.data)
    steps = [Step("baseline", "Baseline", "dense perplexity on the evaluation windows", dense_s, baseline),
             Step("scores", "Layer scores", "LR (how little each layer changes its input) and ZD (weight outliers)",
                  0.0 if scores_if_cached(store, loaded, CALIBRATION) else scoring_seconds(loaded, CALIBRATION),
                  scores)]
    for plan, what in METHOD_STEPS:
        method = method_for(plan)
        if method.refusal(loaded, plan) is None:
            # the baseline step measures dense once, so a method's estimate leaves it out
            seconds = 0.0 if earlier_guided_run(store, loaded, plan) is not None else estimate_run_seconds(
                loaded, plan, CALIBRATION, EVALUATION, dense_needed=False)
            steps.append(Step(method.name, method.title.capitalize(), what, seconds, _runner(store, loaded, plan)))
    return steps


GUIDED_RUNS = StoredKind("guided_run", 1)
"""Which stored run each guided step made (by model, plan and windows): a second guided run shows it again instead
of storing the same run twice."""


def _guided_key(loaded: LoadedModel, plan) -> str:
    return GUIDED_RUNS.key(fingerprint=loaded.fingerprint, plan=asdict(plan), calibration=CALIBRATION.to_dict(),
                           evaluation=EVALUATION.data.to_dict())


def earlier_guided_run(store: ResultsStore, loaded: LoadedModel, plan) -> RunRecord | None:
    """The run an earlier guided run stored for ``plan`` on this model, while it is still stored, else ``None``."""
    payload = GUIDED_RUNS.get(store, _guided_key(loaded, plan))
    try:
        return None if payload is None else store.get_run(int(payload["run"]))
    except KeyError:
        return None


def _runner(store: ResultsStore, loaded: LoadedModel, plan) -> Callable[[StageProgress | None], str]:
    def run_step(progress: StageProgress | None) -> str:
        earlier = earlier_guided_run(store, loaded, plan)
        if earlier is not None:  # the same model, plan and windows give the same run: shown, not stored again
            return run_sentence(earlier) + f" (Stored by an earlier guided run as run {earlier.id}.)"
        record = run(store, loaded, plan, CALIBRATION, EVALUATION, progress=progress).record
        GUIDED_RUNS.put(store, _guided_key(loaded, plan), {"run": record.id})
        return run_sentence(record)

    return run_step


def first_run_seconds(steps: list[Step]) -> float:
    return sum(step.seconds for step in steps)


def skipped_note(loaded: LoadedModel) -> str | None:
    """Why the guided run leaves a method out for this model, or ``None``."""
    return " ".join(filter(None, (method_for(plan).refusal(loaded, plan) for plan, _ in METHOD_STEPS))) or None
