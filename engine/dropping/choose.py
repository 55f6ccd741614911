"""Which layers or blocks to drop: by LR / Block Influence, by the attention-only or MLP-only cosine, by
measured sensitivity, or a list.

ShortGPT drops the layers with the lowest Block Influence BI = 1 − LR (the
highest LR); LLM-Drop drops the attention (or MLP) blocks whose output changes
the residual least (highest block cosine); "sensitivity" drops the blocks whose
removal alone costs least KL on calibration text (the sensitivity lab).

Two ways to choose ``count`` blocks:

- *at once* (:func:`choose_layers`): the top ``count`` of one ranking of the dense model;
- *iteratively* (:func:`choose_iteratively`): drop the top one, rank the
  remaining blocks again on the model without it, repeat.  Costs ``count``
  rankings instead of one; the ranking function is the caller's (the runner
  re-scores the partly dropped model).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.scores.redundancy import LayerRedundancy

BLOCKS = ("layer", "attention", "mlp")
RANKINGS = ("lr", "attention", "mlp", "sensitivity", "custom")
SENSITIVITY_ACTIONS = {"layer": "drop", "attention": "drop-attn", "mlp": "drop-mlp"}
"""The sensitivity-lab action whose measured KL ranks each kind of block."""

LayerRanking = Callable[[list[int]], Sequence[float]]
"""``rank(dropped_so_far)`` → one value per *dense* layer index (higher = drop first; dropped ones ignored)."""


class DropError(ValueError):
    """A dropping request is impossible; the message says what to do."""


def ranking_scores(scores: LayerRedundancy, by: str) -> list[float]:
    """Per-layer redundancy used to rank (higher = drop first): LR, attention-only or MLP-only cosine."""
    if by == "lr":
        return list(scores.lr)
    if by == "attention":
        return list(scores.attn_cos)
    if by == "mlp":
        return list(scores.mlp_cos)
    raise DropError(f"Unknown ranking '{by}'. Choose {', '.join(RANKINGS)}.")


def sensitivity_ranking(kl: Sequence[float]) -> list[float]:
    """Measured KL per layer → ranking values (the cheapest block to remove ranks highest)."""
    return [-float(v) for v in kl]


def droppable(n_layers: int, count: int, protect_ends: bool) -> list[int]:
    """Layers a ranking may pick from; refuses ``count`` below 0 or above what is droppable."""
    if count < 0:
        raise DropError(f"Cannot drop {count} blocks; give 0 or more.")
    candidates = [i for i in range(n_layers) if not (protect_ends and i in (0, n_layers - 1))]
    if count > len(candidates):
        raise DropError(f"Only {len(candidates)} layers can be dropped here"
                        + (" (first and last are protected)" if protect_ends else "") + f"; asked for {count}.")
    return candidates


def check_drop(n_layers: int, block: str, layers: Sequence[int], protect_ends: bool) -> list[int]:
    """Validated, sorted layer indices to drop (``block`` says what of each layer goes)."""
    if block not in BLOCKS:
        raise DropError(f"Unknown block '{block}'. Choose layer, attention or mlp.")
    chosen = sorted(set(int(i) for i in layers))
    outside = [i for i in chosen if not 0 <= i < n_layers]
    if outside:
        raise DropError(f"Layers {outside} do not exist: the model has layers 0..{n_layers - 1}.")
    if block == "layer" and len(chosen) >= n_layers:
        raise DropError(f"Dropping all {n_layers} layers leaves no model: drop at most {n_layers - 1}.")
    if protect_ends and {0, n_layers - 1} & set(chosen):
        raise DropError("The first and last layers are protected (they rewrite the embedding and prepare the "
                        "head); untick 'protect first and last layer' to drop them.")
    return chosen


def choose_layers(scores: LayerRedundancy | None, n_layers: int, count: int, by: str = "lr",
                  protect_ends: bool = True, custom: Sequence[int] = ()) -> list[int]:
    """The ``count`` most redundant layers by ``by`` (or the ``custom`` list), sorted.

    ``protect_ends`` never picks layer 0 or the last layer.
    """
    if by == "custom":
        return sorted(set(int(i) for i in custom))
    candidates = droppable(n_layers, count, protect_ends)
    if scores is None:
        raise DropError("Ranking by scores needs LR scores; compute them first.")
    return top_ranked(ranking_scores(scores, by), candidates, count)


def top_ranked(values: Sequence[float], candidates: Sequence[int], count: int) -> list[int]:
    """The ``count`` candidates with the highest ``values`` (ties: lower index first), sorted."""
    return sorted(sorted(candidates, key=lambda i: (-values[i], i))[:count])


def choose_iteratively(rank: LayerRanking, n_layers: int, count: int, protect_ends: bool = True) -> list[int]:
    """Drop one block at a time: each step takes the highest-ranked remaining candidate of ``rank(dropped)``.

    ``rank`` is called ``count`` times, with the (dense) indices dropped so far.  Sorted result.
    """
    candidates = droppable(n_layers, count, protect_ends)
    dropped: list[int] = []
    for _ in range(count):
        values = rank(sorted(dropped))
        remaining = [i for i in candidates if i not in dropped]
        dropped.append(top_ranked(values, remaining, 1)[0])
    return sorted(dropped)
