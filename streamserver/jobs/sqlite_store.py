"""The embedded job store: one SQLite file (standard library, WAL mode), uploads in a folder beside it.

The default for one machine. Several server processes on that machine may name
the same file: `BEGIN IMMEDIATE` makes every transaction take the write lock up
front, so two claims never hand out the same chunk, and a busy timeout makes a
process wait its turn instead of failing. One connection per store, guarded by a
lock, so worker threads can share it.
"""
from __future__ import annotations

import contextlib
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from .store import LEASE_SECONDS, JobStore

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
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
        turns TEXT,
        owner TEXT,
        lease_until REAL
    )""",
    """CREATE TABLE IF NOT EXISTS chunks (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        start REAL NOT NULL,
        "end" REAL NOT NULL,
        words TEXT,
        owner TEXT,
        lease_until REAL,
        done_by TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    )""",
)
# Columns a file written by an earlier version lacks: added in place, its jobs carry on.
LEASE_COLUMNS = {
    "jobs": ("owner TEXT", "lease_until REAL"),
    "chunks": ("owner TEXT", "lease_until REAL", "done_by TEXT", "attempts INTEGER NOT NULL DEFAULT 0"),
}
BUSY_TIMEOUT_MS = 30_000


class SQLiteJobStore(JobStore):
    NOW = "((julianday('now') - 2440587.5) * 86400.0)"  # this machine's clock, shared by its processes

    def __init__(self, path: str | Path, files: Path | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(lease_seconds)
        self.path = str(path)
        self.files = Path(files) if files is not None else Path(self.path + ".files")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._transaction() as tx:
            for statement in SCHEMA:
                tx.execute(statement)
            for table, columns in LEASE_COLUMNS.items():
                have = {r[1] for r in tx.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in have:
                        tx.execute(f"ALTER TABLE {table} ADD COLUMN {column}")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- audio: files in a folder beside the database -------------------------
    def _keep_audio(self, job_id: str, path: Path) -> str:
        self.files.mkdir(parents=True, exist_ok=True)
        if path.parent.resolve() == self.files.resolve():
            return str(path)  # uploaded straight into our folder
        target = self.files / (job_id + path.suffix[:10])
        shutil.move(str(path), target)
        return str(target)

    @contextlib.contextmanager
    def audio_file(self, job_id: str) -> Iterator[Path]:
        with self._transaction() as tx:
            row = tx.execute("SELECT audio_path FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        yield Path(row[0])

    def _drop_audio(self, job_id: str, audio_path: str) -> None:
        Path(audio_path).unlink(missing_ok=True)
