"""The job queue, kept in SQLite: a job accepted is never lost.

A job is a row: its id, the client that sent it, its kind (txt2img, img2img), the request as JSON, its
state (``queued`` -> ``running`` -> ``done`` | ``failed`` | ``cancelled``), its progress and, when done,
the images' file names (written whole beside the database, :func:`openldm.files.write_atomically`)
and the generation info. Jobs run in the order they were accepted (``seq``). A worker claims a job in one
statement, so two workers never run the same job; when the server starts again, jobs left ``running``
by a killed process go back to ``queued`` and run again.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

State = Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED: tuple[State, ...] = ("done", "failed", "cancelled")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    client TEXT NOT NULL,
    kind TEXT NOT NULL,
    request TEXT NOT NULL,
    state TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
"""


@dataclass(frozen=True)
class Job:
    id: str
    seq: int
    client: str
    kind: str
    request: dict[str, Any]
    state: State
    step: int
    steps: int
    attempts: int
    result: dict[str, Any] | None
    error: str | None
    created: float
    started: float | None
    finished: float | None

    def public(self) -> dict[str, Any]:
        """What ``GET /jobs/{id}`` answers (the request as sent, the images by URL)."""
        return {
            "id": self.id,
            "client": self.client,
            "kind": self.kind,
            "state": self.state,
            "progress": self.step / self.steps if self.steps else (1.0 if self.state == "done" else 0.0),
            "step": self.step,
            "steps": self.steps,
            "attempts": self.attempts,
            "images": [
                f"/jobs/{self.id}/images/{n}" for n in range(len((self.result or {}).get("files", [])))
            ],
            "info": (self.result or {}).get("info"),
            "error": self.error,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
        }


class Store:
    """The queue in ``folder/jobs.sqlite3``, with the images in ``folder/images/``."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.images = self.folder / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # an accepted job is on disk before the answer
        self._db.executescript(_SCHEMA)

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def recover(self) -> int:
        """Jobs a killed server left running go back to the queue; returns how many."""
        return len(self._run("UPDATE jobs SET state='queued', step=0 WHERE state='running' RETURNING id"))

    def requeue(self, job_id: str) -> None:
        self._run("UPDATE jobs SET state='queued', step=0 WHERE id=? AND state='running'", (job_id,))

    def add(self, kind: str, request: dict[str, Any], client: str = "") -> Job:
        job_id = uuid.uuid4().hex
        self._run(
            "INSERT INTO jobs (id, client, kind, request, state, created) VALUES (?, ?, ?, ?, 'queued', ?)",
            (job_id, client, kind, json.dumps(request), time.time()),
        )
        job = self.get(job_id)
        assert job is not None
        return job

    def claim(self) -> Job | None:
        """The oldest queued job, now running (None if the queue is empty)."""
        rows = self._run(
            "UPDATE jobs SET state='running', started=?, attempts=attempts+1 WHERE seq = "
            "(SELECT seq FROM jobs WHERE state='queued' ORDER BY seq LIMIT 1) RETURNING *",
            (time.time(),),
        )
        return _job(rows[0]) if rows else None

    def progress(self, job_id: str, step: int, steps: int) -> None:
        self._run("UPDATE jobs SET step=?, steps=? WHERE id=? AND state='running'", (step, steps, job_id))

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        self._run(
            "UPDATE jobs SET state='done', result=?, finished=? WHERE id=? AND state='running'",
            (json.dumps(result), time.time(), job_id),
        )

    def fail(self, job_id: str, error: str, state: State = "failed") -> None:
        self._run(
            "UPDATE jobs SET state=?, error=?, finished=? WHERE id=? AND state IN ('queued', 'running')",
            (state, error, time.time(), job_id),
        )

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job (a running one stops at its next step); False if finished."""
        rows = self._run(
            "UPDATE jobs SET state='cancelled', error='cancelled', finished=? "
            "WHERE id=? AND state IN ('queued', 'running') RETURNING id",
            (time.time(), job_id),
        )
        return bool(rows)

    def cancelled_since(self, when: float) -> list[Job]:
        """Jobs cancelled after ``when`` (a time), in the order they were."""
        rows = self._run(
            "SELECT * FROM jobs WHERE state='cancelled' AND finished > ? ORDER BY finished", (when,)
        )
        return [_job(r) for r in rows]

    def get(self, job_id: str) -> Job | None:
        rows = self._run("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, states: tuple[State, ...] | None = None, limit: int = 100) -> list[Job]:
        if states is None:
            rows = self._run("SELECT * FROM jobs ORDER BY seq DESC LIMIT ?", (limit,))
        else:
            marks = ",".join("?" * len(states))
            rows = self._run(
                f"SELECT * FROM jobs WHERE state IN ({marks}) ORDER BY seq LIMIT ?", (*states, limit)
            )
        return [_job(r) for r in rows]

    def ahead_of(self, job: Job) -> int:
        """How many jobs run before ``job`` (queued or running, accepted before it)."""
        sql = "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running') AND seq < ?"
        return int(self._run(sql, (job.seq,))[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        seq=row["seq"],
        client=row["client"],
        kind=row["kind"],
        request=json.loads(row["request"]),
        state=row["state"],
        step=row["step"],
        steps=row["steps"],
        attempts=row["attempts"],
        result=json.loads(row["result"]) if row["result"] else None,
        error=row["error"],
        created=row["created"],
        started=row["started"],
        finished=row["finished"],
    )
