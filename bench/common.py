"""Shared benchmark output: a printed table and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def report(name: str, rows: list[dict], meta: dict) -> Path:
    """Print ``rows`` as an aligned table and write ``bench/results/<name>.json``."""
    columns = list(dict.fromkeys(key for row in rows for key in row))  # every key, in first-seen order
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"-> {path}")
    return path


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)
