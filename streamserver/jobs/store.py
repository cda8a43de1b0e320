"""The durable queue of file transcription jobs: SQLite (standard library, WAL mode).

A job is an uploaded file on disk plus a row; once decoded it is cut into chunks,
and each chunk's words are stored the moment that chunk is transcribed. So a job
survives a restart or a `kill -9`: at start-up every job that was running goes
back to the queue and resumes at its first unfinished chunk; nothing is done twice.
All methods are short transactions; one connection per store, guarded by a lock,
so the event loop and worker threads can share it.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    audio_path TEXT NOT NULL,
    audio_seconds REAL,
    language TEXT,
    prompt TEXT,
    diarization INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    turns TEXT
);
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    start REAL NOT NULL,
    end REAL NOT NULL,
    words TEXT,
    PRIMARY KEY (job_id, idx)
);
"""

STATUSES = ("queued", "running", "paused", "done", "failed")


@dataclass
class Job:
    id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
    audio_path: str
    audio_seconds: float | None
    language: str | None
    prompt: str | None
    diarization: bool
    error: str | None
    chunks: int = 0
    chunks_done: int = 0

    @property
    def progress(self) -> float:
        if self.status == "done":
            return 1.0
        return self.chunks_done / self.chunks if self.chunks else 0.0

    def public(self) -> dict:
        """The contract's `GET /jobs/{id}` shape."""
        return {
            "id": self.id, "status": self.status, "progress": round(self.progress, 4),
            "audio_seconds": self.audio_seconds, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "error": self.error,
        }


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs -------------------------------------------------------------
    def create(self, audio_path: str, language: str | None = None, prompt: str | None = None,
               diarization: bool = False, job_id: str | None = None) -> Job:
        job_id = job_id or uuid.uuid4().hex
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, status, created_at, audio_path, language, prompt, diarization) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, time.time(), audio_path, language, prompt, int(diarization)),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(_SELECT + " WHERE j.id = ? GROUP BY j.id", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        where, args = ("WHERE j.status = ?", (status,)) if status else ("", ())
        with self._lock:
            rows = self._db.execute(
                _SELECT + f" {where} GROUP BY j.id ORDER BY j.created_at DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [_job(r) for r in rows]

    def next_queued(self) -> Job | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'paused', 'running') ORDER BY created_at LIMIT 1"
            ).fetchone()
        return self.get(row[0]) if row else None

    def set_status(self, job_id: str, status: str, error: str | None = None) -> None:
        assert status in STATUSES
        now = time.time()
        with self._lock:
            if status == "running":
                self._db.execute("UPDATE jobs SET status = ?, started_at = COALESCE(started_at, ?) WHERE id = ?",
                                 (status, now, job_id))
            elif status in ("done", "failed"):
                self._db.execute("UPDATE jobs SET status = ?, finished_at = ?, error = ? WHERE id = ?",
                                 (status, now, error, job_id))
            else:
                self._db.execute("UPDATE jobs SET status = ? WHERE id = ?", (status, job_id))

    def delete(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is not None:
            with self._lock:
                self._db.execute("DELETE FROM chunks WHERE job_id = ?", (job_id,))
                self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return job

    def requeue_interrupted(self) -> int:
        """At start-up: jobs left running by a stopped server go back to the queue."""
        with self._lock:
            return self._db.execute("UPDATE jobs SET status = 'queued' WHERE status IN ('running', 'paused')").rowcount

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: n for s, n in rows})
        return out

    # -- chunks -----------------------------------------------------------
    def set_chunks(self, job_id: str, seconds: float, spans: list[tuple[float, float]]) -> None:
        """Record the file's length and its chunks (once: a resumed job keeps its first cut)."""
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE jobs SET audio_seconds = ? WHERE id = ?", (seconds, job_id))
            if not self._db.execute("SELECT 1 FROM chunks WHERE job_id = ? LIMIT 1", (job_id,)).fetchone():
                self._db.executemany("INSERT INTO chunks (job_id, idx, start, end) VALUES (?, ?, ?, ?)",
                                     [(job_id, i, a, b) for i, (a, b) in enumerate(spans)])
            self._db.execute("COMMIT")

    def pending_chunks(self, job_id: str) -> list[tuple[int, float, float]]:
        with self._lock:
            return self._db.execute(
                "SELECT idx, start, end FROM chunks WHERE job_id = ? AND words IS NULL ORDER BY idx", (job_id,)
            ).fetchall()

    def chunk_done(self, job_id: str, idx: int, words: list[dict]) -> bool:
        """Store a chunk's words; False if the job was deleted meanwhile."""
        with self._lock:
            cur = self._db.execute("UPDATE chunks SET words = ? WHERE job_id = ? AND idx = ? AND words IS NULL",
                                   (json.dumps(words), job_id, idx))
            return cur.rowcount == 1

    def set_turns(self, job_id: str, turns: list[tuple[float, float, int]]) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET turns = ? WHERE id = ?", (json.dumps(turns), job_id))

    def turns(self, job_id: str) -> list[tuple[float, float, int]] | None:
        with self._lock:
            row = self._db.execute("SELECT turns FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return [tuple(t) for t in json.loads(row[0])] if row and row[0] else None

    def words(self, job_id: str) -> list[dict]:
        with self._lock:
            rows = self._db.execute("SELECT words FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        return [w for (text,) in rows if text for w in json.loads(text)]


_SELECT = (
    "SELECT j.id, j.status, j.created_at, j.started_at, j.finished_at, j.audio_path, j.audio_seconds, "
    "j.language, j.prompt, j.diarization, j.error, COUNT(c.idx), COUNT(c.words) "
    "FROM jobs j LEFT JOIN chunks c ON c.job_id = j.id"
)


def _job(row) -> Job:
    return Job(*row[:9], bool(row[9]), row[10], row[11], row[12])
