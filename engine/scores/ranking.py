"""Ranks, Spearman correlation and importance orderings of per-layer scores."""

from __future__ import annotations

import torch


def ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values`` (ascending), ties get their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            result[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two equally long score vectors."""
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


def importance_order(importance: list[float]) -> list[int]:
    """Layer indices from most to least important (higher score = more important)."""
    return sorted(range(len(importance)), key=lambda i: -importance[i])


def zd_importance(zd_layer: list[float]) -> list[float]:
    """ZD as an importance (higher = more important): smaller ZD is more important."""
    return [-v for v in zd_layer]
