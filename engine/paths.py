"""Where LayerLab keeps runtime data."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Runtime data folder: ``$LAYERLAB_CACHE`` if set, else ``cache/`` in the project."""
    root = Path(os.environ.get("LAYERLAB_CACHE", PROJECT_ROOT / "cache"))
    root.mkdir(parents=True, exist_ok=True)
    return root
