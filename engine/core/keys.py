"""Stable cache keys and the payload cache every stored computation uses.

:func:`cache_key` hashes keyword parts (JSON-serialisable values) into a
stable key; :class:`PayloadCache` is what a cached computation needs from a
store (``get_cached`` / ``put_cached``), so the packages below the workflow
layer (quantization, sensitivity) depend on this interface, not on the
results store that implements it (:class:`engine.runs.store.ResultsStore`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Protocol


def cache_key(**parts) -> str:
    """Stable key from keyword parts (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class PayloadCache(Protocol):
    """A store of JSON payloads by key."""

    def get_cached(self, key: str) -> dict | None: ...

    def put_cached(self, key: str, kind: str, payload: dict) -> None: ...
