"""Which layers or blocks to drop: by LR / Block Influence, by the attention-only or MLP-only cosine, or a list.

ShortGPT drops the layers with the lowest Block Influence BI = 1 − LR (the
highest LR); LLM-Drop drops the attention (or MLP) blocks whose output changes
the residual least (highest block cosine).  Choices are made *at once* from
one scoring pass of the dense model ("iterative" re-scoring after each drop
is a runner option).
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.scores.redundancy import LayerRedundancy

BLOCKS = ("layer", "attention", "mlp")
RANKINGS = ("lr", "attention", "mlp", "custom")


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
    raise DropError(f"Unknown ranking '{by}'. Choose lr, attention, mlp or custom.")


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
    if count < 0:
        raise DropError(f"Cannot drop {count} blocks; give 0 or more.")
    candidates = [i for i in range(n_layers) if not (protect_ends and i in (0, n_layers - 1))]
    if count > len(candidates):
        raise DropError(f"Only {len(candidates)} layers can be dropped here"
                        + (" (first and last are protected)" if protect_ends else "") + f"; asked for {count}.")
    if scores is None:
        raise DropError("Ranking by scores needs LR scores; compute them first.")
    values = ranking_scores(scores, by)
    return sorted(sorted(candidates, key=lambda i: -values[i])[:count])
