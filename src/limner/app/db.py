"""The app's jobs in SQLite, beside the library: every page, every browser tab and the next server start
read the same rows, so a reload or a restart loses nothing.

One row per job: its kind, its state, the parameters it was started with (JSON), its progress (JSON, as the
worker last read it), its result (JSON: the files it wrote) and, where it failed, the error. A connection
per call keeps the store safe to use from the workers' threads and the request handlers at once; WAL lets
readers go on while a worker writes.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "done",
    "failed",
    "cancelled",
    "interrupted",
)
STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED)
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    params TEXT NOT NULL,
    progress TEXT NOT NULL DEFAULT '{}',
    result TEXT NOT NULL DEFAULT '{}',
    error TEXT,
    pid INTEGER,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)
"""


@dataclass
class Job:
    id: int
    kind: str
    state: str
    params: dict[str, Any]
    progress: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pid: int | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None
    cancel_requested: bool = False

    @property
    def name(self) -> str:
        """What a person calls the job: the concept it trains, or the start of its prompt."""
        p = self.params
        return str(p.get("name") or p.get("concept_name") or p.get("prompt") or p.get("template") or "")[:60]


class JobStore:
    """The jobs table of one library's `jobs.sqlite`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # sqlite serialises writers too; this keeps claim-then-update atomic
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _run(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        db = self._connect()
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def add(self, kind: str, params: dict[str, Any]) -> int:
        with self._lock:
            db = self._connect()
            try:
                cur = db.execute(
                    "INSERT INTO jobs (kind, state, params, created) VALUES (?, ?, ?, ?)",
                    (kind, QUEUED, json.dumps(params), time.time()),
                )
                return int(cur.lastrowid)
            finally:
                db.close()

    def get(self, job_id: int) -> Job | None:
        rows = self._run("SELECT * FROM jobs WHERE id = ?", (int(job_id),))
        return _job(rows[0]) if rows else None

    def list(self, kinds: tuple[str, ...] | None = None, states: tuple[str, ...] | None = None) -> list[Job]:
        """Newest first."""
        sql, args = "SELECT * FROM jobs", []
        where = []
        if kinds:
            where.append(f"kind IN ({','.join('?' * len(kinds))})")
            args += kinds
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_job(r) for r in self._run(sql + " ORDER BY id DESC", tuple(args))]

    def claim(self, kinds: tuple[str, ...]) -> Job | None:
        """The oldest queued job of these kinds, now marked running; None if there is none."""
        with self._lock:
            marks = ",".join("?" * len(kinds))
            rows = self._run(
                f"SELECT id FROM jobs WHERE state = ? AND kind IN ({marks}) ORDER BY id LIMIT 1", (QUEUED, *kinds)
            )
            if not rows:
                return None
            job_id = rows[0]["id"]
            self._run(
                "UPDATE jobs SET state = ?, started = ?, finished = NULL, error = NULL WHERE id = ?",
                (RUNNING, time.time(), job_id),
            )
        return self.get(job_id)

    def update(self, job_id: int, **values: Any) -> None:
        """Sets columns; dicts (params, progress, result) are stored as JSON; a finished state stamps the time."""
        if not values:
            return
        if values.get("state") in FINISHED and "finished" not in values:
            values["finished"] = time.time()
        cols = ", ".join(f"{k} = ?" for k in values)
        args = tuple(json.dumps(v) if isinstance(v, dict) else v for v in values.values())
        with self._lock:
            self._run(f"UPDATE jobs SET {cols} WHERE id = ?", (*args, int(job_id)))

    def delete(self, job_id: int) -> None:
        with self._lock:
            self._run("DELETE FROM jobs WHERE id = ?", (int(job_id),))


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        kind=row["kind"],
        state=row["state"],
        params=json.loads(row["params"]),
        progress=json.loads(row["progress"] or "{}"),
        result=json.loads(row["result"] or "{}"),
        error=row["error"],
        pid=row["pid"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
        cancel_requested=bool(row["cancel_requested"]),
    )
