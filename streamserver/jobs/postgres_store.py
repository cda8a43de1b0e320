"""The shared job store: one PostgreSQL database that every server names with `--jobs-db postgresql://...`.

Claims lock the rows they pick with `FOR UPDATE ... SKIP LOCKED`, so servers
claiming at the same moment take different chunks without waiting on each other.
Uploaded audio is stored in the database too (table `job_audio`, in 8 MB parts):
a job created through one server is then readable by every other with nothing
but the URL, where a shared folder would need the same volume mounted on every
machine and fails silently when one is not. A server decoding a job writes the
parts to a local temporary file for as long as it decodes, then removes it.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .store import LEASE_SECONDS, JobStore

log = logging.getLogger("streamserver.jobs")

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        finished_at DOUBLE PRECISION,
        audio_path TEXT NOT NULL,
        audio_seconds DOUBLE PRECISION,
        language TEXT,
        prompt TEXT,
        diarization INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        turns TEXT,
        owner TEXT,
        lease_until DOUBLE PRECISION
    )""",
    """CREATE TABLE IF NOT EXISTS chunks (
        job_id TEXT NOT NULL,
        idx INTEGER NOT NULL,
        start DOUBLE PRECISION NOT NULL,
        "end" DOUBLE PRECISION NOT NULL,
        words TEXT,
        owner TEXT,
        lease_until DOUBLE PRECISION,
        done_by TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (job_id, idx)
    )""",
    "CREATE INDEX IF NOT EXISTS chunks_waiting ON chunks (job_id, idx) WHERE words IS NULL",
    "CREATE INDEX IF NOT EXISTS jobs_active ON jobs (created_at) WHERE status IN ('queued', 'running', 'paused')",
    """CREATE TABLE IF NOT EXISTS job_audio (
        job_id TEXT NOT NULL,
        part INTEGER NOT NULL,
        data BYTEA NOT NULL,
        PRIMARY KEY (job_id, part)
    )""",
)
SCHEMA_LOCK = 0x5753_4A4F  # an advisory lock: servers starting together create the tables once
PART_BYTES = 8 << 20
CONNECT_TIMEOUT = 10


class PostgresJobStore(JobStore):
    NOW = "(extract(epoch from clock_timestamp())::double precision)"  # the database's clock, for every server
    SKIP_LOCKED = "FOR UPDATE OF {} SKIP LOCKED"

    def __init__(self, url: str, files: Path, lease_seconds: float = LEASE_SECONDS) -> None:
        super().__init__(lease_seconds)
        self.url = url
        self.files = Path(files)
        self._lock = threading.Lock()
        self._conn = None
        with self._transaction() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            for statement in SCHEMA:
                tx.execute(statement)

    def _connect(self):
        import psycopg

        return psycopg.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name="streamserver")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator:
        """One transaction on this store's connection; a broken connection (the database restarted) is
        replaced at the next call, and the call that saw it breaks fails with the driver's error."""
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                if self._conn is not None:
                    log.warning("Job database connection lost; reconnecting")
                    self._conn.close()
                self._conn = self._connect()
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur

    def _sql(self, text: str) -> str:
        return super()._sql(text).replace("?", "%s")

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    # -- audio: in the database, readable by every server ---------------------
    def _keep_audio(self, job_id: str, path: Path) -> str:
        with self._transaction() as tx, open(path, "rb") as f:
            part = 0
            while block := f.read(PART_BYTES):
                tx.execute("INSERT INTO job_audio (job_id, part, data) VALUES (%s, %s, %s)", (job_id, part, block))
                part += 1
        path.unlink(missing_ok=True)
        return "postgresql:job_audio"

    @contextlib.contextmanager
    def audio_file(self, job_id: str) -> Iterator[Path]:
        with self._transaction() as tx:
            parts = tx.execute("SELECT COUNT(*) FROM job_audio WHERE job_id = %s", (job_id,)).fetchone()[0]
        if not parts:
            raise KeyError(job_id)
        self.files.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=self.files, prefix=job_id + "-") as out:
            for part in range(parts):  # one part in memory at a time
                with self._transaction() as tx:
                    out.write(tx.execute("SELECT data FROM job_audio WHERE job_id = %s AND part = %s",
                                         (job_id, part)).fetchone()[0])
            out.flush()
            yield Path(out.name)

    def _drop_audio(self, job_id: str, audio_path: str) -> None:
        with self._transaction() as tx:
            tx.execute("DELETE FROM job_audio WHERE job_id = %s", (job_id,))
