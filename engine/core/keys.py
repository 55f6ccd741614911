"""Stable cache keys and the payload cache every stored computation uses.

:func:`cache_key` hashes keyword parts (JSON-serialisable values) into a
stable key; :class:`StoredKind` is one kind of stored computation (its name,
version, key and payload in one place: scores, sensitivity, optimizer results,
drop choices); :class:`PayloadCache` is what a cached computation needs from a
store (``get_cached`` / ``put_cached``), so the packages below the workflow
layer (quantization, sensitivity) depend on this interface, not on the
results store that implements it (:class:`engine.runs.store.ResultsStore`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Protocol


def cache_key(**parts) -> str:
    """Stable key from keyword parts (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class PayloadCache(Protocol):
    """A store of JSON payloads by key."""

    def get_cached(self, key: str) -> dict | None: ...

    def put_cached(self, key: str, kind: str, payload: dict) -> None: ...


@dataclass(frozen=True)
class StoredKind:
    """One kind of stored computation: JSON payloads under keys made of its ``kind``, ``version`` and inputs.

    Bump ``version`` when the payload or the computation changes: older entries are then never read.
    ``version=None`` leaves it out of the key (kinds that never had one keep their keys).
    """

    kind: str
    version: int | None = None

    def key(self, **inputs) -> str:
        """The key of the entry computed from ``inputs`` (keyword parts, JSON-serialisable)."""
        return cache_key(kind=self.kind, **({} if self.version is None else {"version": self.version}), **inputs)

    def get(self, store: PayloadCache, key: str) -> dict | None:
        """The stored payload, or ``None`` (nothing is computed)."""
        return store.get_cached(key)

    def put(self, store: PayloadCache, key: str, payload: dict) -> None:
        store.put_cached(key, self.kind, payload)
