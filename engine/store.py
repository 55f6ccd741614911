"""Results store: every run and every cached score table, in SQLite under ``cache/``.

Each write is one transaction, so a crash leaves either the whole row or
nothing.  Cached payloads carry a SHA-256 checksum that is verified on read; a
corrupt entry is treated as a miss and removed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from engine.paths import cache_root

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    model_fingerprint TEXT NOT NULL,
    method TEXT NOT NULL,
    config_json TEXT NOT NULL,
    data_json TEXT NOT NULL,
    metrics_json TEXT NOT NULL,
    duration_s REAL NOT NULL,
    versions_json TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS cache_entries (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    created_at TEXT NOT NULL,
    checksum TEXT NOT NULL,
    payload TEXT NOT NULL
);
"""


def library_versions() -> dict[str, str]:
    """Versions that can change a result: Python, torch, transformers."""
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cache_key(**parts) -> str:
    """Stable key from keyword parts (JSON-serialisable values)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Run:
    """One stored result."""

    id: int
    created_at: str
    model: str
    model_fingerprint: str
    method: str
    config: dict
    data: dict
    metrics: dict
    duration_s: float


class ResultsStore:
    """SQLite-backed store of runs and cached score payloads."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else cache_root() / "results.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn, conn:
            conn.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def add_run(
        self,
        *,
        model: str,
        model_fingerprint: str,
        method: str,
        config: dict,
        data: dict,
        metrics: dict,
        duration_s: float,
    ) -> int:
        """Store one result atomically and return its id."""
        row = (
            _now(), model, model_fingerprint, method,
            json.dumps(config, sort_keys=True), json.dumps(data, sort_keys=True),
            json.dumps(metrics, sort_keys=True), float(duration_s), json.dumps(library_versions()),
        )
        with closing(self._connect()) as conn, conn:
            cursor = conn.execute(
                "INSERT INTO runs (created_at, model, model_fingerprint, method, config_json,"
                " data_json, metrics_json, duration_s, versions_json) VALUES (?,?,?,?,?,?,?,?,?)",
                row,
            )
            return int(cursor.lastrowid)

    def runs(self, model: str | None = None, method: str | None = None) -> list[Run]:
        """Stored runs, newest first, optionally filtered by model and method."""
        query, args = "SELECT id, created_at, model, model_fingerprint, method, config_json, data_json," \
            " metrics_json, duration_s FROM runs WHERE 1=1", []
        if model is not None:
            query, args = query + " AND model = ?", args + [model]
        if method is not None:
            query, args = query + " AND method = ?", args + [method]
        with closing(self._connect()) as conn:
            rows = conn.execute(query + " ORDER BY id DESC", args).fetchall()
        return [
            Run(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), json.loads(r[6]), json.loads(r[7]), r[8])
            for r in rows
        ]

    def runs_frame(self, model: str | None = None, method: str | None = None) -> pd.DataFrame:
        """Runs as a DataFrame; config, data and metrics keys become prefixed columns."""
        records = []
        for run in self.runs(model, method):
            record = {
                "id": run.id, "when": run.created_at, "model": run.model,
                "fingerprint": run.model_fingerprint, "method": run.method,
                "duration_s": round(run.duration_s, 2),
            }
            record.update({f"config.{k}": _cell(v) for k, v in run.config.items()})
            record.update({f"data.{k}": _cell(v) for k, v in run.data.items()})
            record.update({f"metrics.{k}": _cell(v) for k, v in run.metrics.items()})
            records.append(record)
        return pd.DataFrame.from_records(records)

    def put_cached(self, key: str, kind: str, payload: dict) -> None:
        """Store a JSON payload under ``key`` (replacing any older one)."""
        text = json.dumps(payload)
        checksum = hashlib.sha256(text.encode()).hexdigest()
        with closing(self._connect()) as conn, conn:
            conn.execute(
                "INSERT OR REPLACE INTO cache_entries (key, kind, created_at, checksum, payload)"
                " VALUES (?,?,?,?,?)",
                (key, kind, _now(), checksum, text),
            )

    def get_cached(self, key: str) -> dict | None:
        """The payload under ``key``, or None if absent or failing its checksum."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT checksum, payload FROM cache_entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        checksum, text = row
        if hashlib.sha256(text.encode()).hexdigest() != checksum:
            with closing(self._connect()) as conn, conn:
                conn.execute("DELETE FROM cache_entries WHERE key = ?", (key,))
            return None
        return json.loads(text)


def _cell(value):
    """Lists and dicts are shown as JSON text in table cells."""
    return json.dumps(value) if isinstance(value, (list, dict)) else value


class Timer:
    """Context manager measuring wall time in seconds (``.seconds``)."""

    def __enter__(self) -> "Timer":
        self._start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start
