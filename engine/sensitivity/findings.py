"""The one-line finding of a sensitivity lab, written from the agreement table (never by hand)."""

from __future__ import annotations

from engine.sensitivity.actions import Action
from engine.sensitivity.agreement import Agreement

PAPER_SCORES = ("LR", "ZD")
"""The scores the layer-wise papers allocate by (LR stands for its identical rankings LIM and BI)."""


def rho_text(row: Agreement) -> str:
    """``ρ = 0.71 [0.52, 0.84]``: the estimate and its bootstrap 95% interval."""
    return f"ρ = {row.rho:.2f} [{row.low:.2f}, {row.high:.2f}]"


def score_names(rows: list[Agreement]) -> dict[str, str]:
    """Display name of each distinct ranking: ``LR = LIM = BI`` for scores that rank identically."""
    names: dict[str, list[str]] = {}
    for row in rows:
        group = names.setdefault(row.same_as or row.score, [row.same_as or row.score])
        if row.score not in group:
            group.append(row.score)
    return {first: " = ".join(group) for first, group in names.items()}


def _join(parts: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _costs(rows: list[Agreement], by_key: dict[str, Action]) -> str:
    """``3-bit RTN (ρ = …) and layer-drop cost (ρ = …)``: the actions of one clause with their numbers."""
    parts = [f"{by_key[r.action].cost_word} ({rho_text(r)})" for r in rows]
    parts[-1] = parts[-1].replace(" (ρ", " cost (ρ", 1)
    return _join(parts)


def sensitivity_finding(rows: list[Agreement], actions: list[Action]) -> str:
    """One sentence: per action the score that ranks its cost best, then the paper scores' worst miss.

    Actions sharing the best score and verdict are named together, e.g. ``LR ranks 3-bit RTN
    (ρ = 0.75 [0.66, 0.79]) and layer-drop cost (ρ = 0.81 [0.79, 0.83]) well here; ZD ranks 25% slicing
    cost backwards (ρ = -0.48 [-0.51, -0.36]).``  Verdicts come from ρ and its interval
    (:attr:`Agreement.verdict`); nothing is written by hand.
    """
    by_key = {a.key: a for a in actions}
    distinct = [r for r in rows if r.same_as is None and r.action in by_key]
    if not distinct:
        return "Nothing measured yet."
    groups: dict[tuple[str, str], list[Agreement]] = {}
    for action in actions:
        candidates = [r for r in distinct if r.action == action.key]
        if candidates:
            best = max(candidates, key=lambda r: r.rho)
            groups.setdefault((best.score, best.verdict), []).append(best)
    clauses = []
    for (score, verdict), group in groups.items():
        if verdict in ("well", "partly"):
            clauses.append(f"{score} ranks {_costs(group, by_key)} {verdict} here")
        elif verdict == "backwards":
            clauses.append(f"every score ranks {_costs(group, by_key)} backwards here (best: {score})")
        else:
            clauses.append(f"no score ranks {_costs(group, by_key)} reliably here (best: {score})")
    named = {(r.score, r.action) for group in groups.values() for r in group}
    misses = [r for r in distinct if r.score in PAPER_SCORES and r.verdict in ("not", "backwards")
              and (r.score, r.action) not in named]
    if misses:
        worst = min(misses, key=lambda r: r.rho)
        how = "ranks" if worst.verdict == "backwards" else "does not rank"
        tail = " backwards" if worst.verdict == "backwards" else ""
        clauses.append(f"{worst.score} {how} {by_key[worst.action].cost_word} cost{tail} ({rho_text(worst)})")
    text = "; ".join(clauses)
    return text[0].upper() + text[1:] + "."
