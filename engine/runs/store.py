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
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from engine.core.paths import cache_root
from engine.runs.record import RunRecord

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
CREATE TABLE IF NOT EXISTS interrupted (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at TEXT NOT NULL,
    model TEXT NOT NULL,
    label TEXT NOT NULL,
    page TEXT NOT NULL,
    started TEXT NOT NULL,
    completed TEXT NOT NULL
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
    return datetime.now(UTC).isoformat(timespec="seconds")


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

    def runs(self, model: str | None = None, method: str | None = None) -> list[RunRecord]:
        """Stored runs, newest first, optionally filtered by model and method."""
        query, args = "SELECT id, created_at, model, model_fingerprint, method, config_json, data_json," \
            " metrics_json, duration_s, versions_json FROM runs WHERE 1=1", []
        if model is not None:
            query, args = query + " AND model = ?", args + [model]
        if method is not None:
            query, args = query + " AND method = ?", args + [method]
        with closing(self._connect()) as conn:
            rows = conn.execute(query + " ORDER BY id DESC", args).fetchall()
        return [_record(r) for r in rows]

    def get_run(self, run_id: int) -> RunRecord:
        """One stored run by id (KeyError if there is none)."""
        with closing(self._connect()) as conn:
            row = conn.execute("SELECT id, created_at, model, model_fingerprint, method, config_json, data_json,"
                               " metrics_json, duration_s, versions_json FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise KeyError(f"No stored run {run_id}.")
        return _record(row)

    def add_export(self, run_id: int, export: dict) -> RunRecord:
        """Append one export (format, where, size, verification) to the run's ``config["exports"]``."""
        with closing(self._connect()) as conn, conn:
            row = conn.execute("SELECT config_json FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(f"No stored run {run_id}.")
            config = json.loads(row[0])
            config["exports"] = [*config.get("exports", []), export]
            conn.execute("UPDATE runs SET config_json = ? WHERE id = ?", (json.dumps(config, sort_keys=True), run_id))
        return self.get_run(run_id)

    def add_interrupted(self, *, model: str, label: str, page: str, started: str, completed: str) -> int:
        """Record a computation that stopped before it finished (the user left its page): what it was, where and
        when it started, and how far it got (``completed``, e.g. ``"layer 12/30"``).  Not a run: no metrics."""
        with closing(self._connect()) as conn, conn:
            cursor = conn.execute("INSERT INTO interrupted (created_at, model, label, page, started, completed)"
                                  " VALUES (?,?,?,?,?,?)", (_now(), model, label, page, started, completed))
            return int(cursor.lastrowid)

    def interrupted(self) -> pd.DataFrame:
        """Interrupted computations, newest first: id, created_at (when the stop was noticed), model, label, page,
        started, completed."""
        with closing(self._connect()) as conn:
            return pd.read_sql_query("SELECT id, created_at, model, label, page, started, completed"
                                     " FROM interrupted ORDER BY id DESC", conn)

    def clear_interrupted(self) -> None:
        """Forget every interrupted computation (stored runs are untouched)."""
        with closing(self._connect()) as conn, conn:
            conn.execute("DELETE FROM interrupted")

    def runs_frame(self, model: str | None = None, method: str | None = None) -> pd.DataFrame:
        """Runs as a DataFrame; config, data and metrics keys become prefixed columns."""
        return pd.DataFrame.from_records([run.to_row() for run in self.runs(model, method)])

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


def _record(row: tuple) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], row[3], row[4], json.loads(row[5]), json.loads(row[6]),
                     json.loads(row[7]), row[8], json.loads(row[9]))
