"""The durable queue of file transcription jobs, shared by every server that names it.

A job is an uploaded file plus a row; once decoded it is cut into chunks, and
each chunk's words are stored the moment that chunk is transcribed. Work is
handed out by leases, so any number of servers (or one server restarted after a
`kill -9`) can share one queue and nothing is done twice:

- a server *claims* chunks: it becomes their owner until `lease_until`, and
  renews its leases (a heartbeat) while it works on them;
- a chunk whose owner stopped renewing (a dead server) is claimable again once
  its lease has run out; a server that stops cleanly hands its leases back;
- a chunk's words are accepted only from its owner within the lease: a late
  write from a server that lost its lease is refused;
- the two whole-job steps, cutting the file into chunks and finishing the job
  (speaker turns, then `done`), are claimed the same way on the job row, and a
  job becomes `done` in one conditional update, so its result is assembled once.

Times are the database's clock (`_NOW`), never a server's, so servers whose
clocks differ still agree on who holds what. `JobStore` is the interface and
the SQL both stores share; `SQLiteJobStore` (the embedded default, one machine)
and `PostgresJobStore` (many machines) differ only in connections, locking and
where the uploaded audio lives.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("queued", "running", "paused", "done", "failed")
ACTIVE = "('queued', 'running', 'paused')"
LEASE_SECONDS = 30.0


@dataclass
class Job:
    id: str
    status: str
    created_at: float
    started_at: float | None
    finished_at: float | None
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

    @property
    def cut(self) -> bool:
        """Whether the file has been cut into chunks (its length is known from then on)."""
        return self.audio_seconds is not None

    def public(self) -> dict:
        """The contract's `GET /jobs/{id}` shape."""
        return {
            "id": self.id, "status": self.status, "progress": round(self.progress, 4),
            "audio_seconds": self.audio_seconds, "created_at": self.created_at, "started_at": self.started_at,
            "finished_at": self.finished_at, "error": self.error,
        }


@dataclass(frozen=True)
class Chunk:
    """One claimed piece of a job: seconds `start`..`end` of its file."""

    job_id: str
    idx: int
    start: float
    end: float
    taken_over: bool = False  # its previous owner's lease ran out (that server died)


class JobStore(ABC):
    """What the runner and the HTTP API need of a job queue, in SQL both databases speak.

    A subclass supplies the connection (`_transaction`), the clock expression (`NOW`),
    the row-locking clause of a claim (`SKIP_LOCKED`) and the storage of uploaded audio.
    Every method is one short transaction and blocks: call them off the event loop."""

    NOW = ""  # SQL: the database's clock, epoch seconds
    SKIP_LOCKED = ""  # closes the SELECT of a claim; `{}`: the table alias whose rows it locks
    SCHEMA: tuple[str, ...] = ()

    def __init__(self, lease_seconds: float = LEASE_SECONDS) -> None:
        self.lease_seconds = lease_seconds

    # -- what a subclass supplies ------------------------------------------
    @abstractmethod
    def _transaction(self) -> contextlib.AbstractContextManager:
        """A context manager giving a cursor-like object with `execute(sql, args)`, committed on exit."""

    @abstractmethod
    def _keep_audio(self, job_id: str, path: Path) -> str:
        """Take the uploaded file into the store; returns what `jobs.audio_path` records."""

    @abstractmethod
    def audio_file(self, job_id: str) -> contextlib.AbstractContextManager[Path]:
        """The job's audio as a local file, for as long as the `with` block runs."""

    @abstractmethod
    def _drop_audio(self, job_id: str, audio_path: str) -> None:
        """Forget the job's audio (deleted or synchronous job done)."""

    @abstractmethod
    def close(self) -> None: ...

    def _sql(self, text: str) -> str:
        """Our SQL uses `?` placeholders and `{now}`/`{skip:alias}` markers; a subclass may rewrite them."""
        text = text.replace("{now}", self.NOW)
        return re.sub(r"\{skip:(\w+)\}", lambda m: self.SKIP_LOCKED.format(m.group(1)), text)

    def _run(self, tx, sql: str, args: tuple = ()):
        return tx.execute(self._sql(sql), args)

    # -- jobs ---------------------------------------------------------------
    def create(self, audio: Path, language: str | None = None, prompt: str | None = None,
               diarization: bool = False, job_id: str | None = None) -> Job:
        """A queued job for `audio`, which the store takes over (the caller's file may be gone after)."""
        job_id = job_id or uuid.uuid4().hex
        stored = self._keep_audio(job_id, Path(audio))
        with self._transaction() as tx:
            self._run(tx, "INSERT INTO jobs (id, status, created_at, audio_path, language, prompt, diarization) "
                          "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                      (job_id, time.time(), stored, language, prompt, int(diarization)))
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        with self._transaction() as tx:
            row = self._run(tx, _SELECT + " WHERE j.id = ? GROUP BY j.id", (job_id,)).fetchone()
        return _job(row) if row else None

    def list(self, status: str | None = None, limit: int = 100) -> list[Job]:
        where, args = ("WHERE j.status = ?", (status,)) if status else ("", ())
        with self._transaction() as tx:
            rows = self._run(tx, _SELECT + f" {where} GROUP BY j.id ORDER BY j.created_at DESC LIMIT ?",
                             (*args, limit)).fetchall()
        return [_job(r) for r in rows]

    def delete(self, job_id: str) -> Job | None:
        job = self.get(job_id)
        if job is None:
            return None
        with self._transaction() as tx:
            row = self._run(tx, "SELECT audio_path FROM jobs WHERE id = ?", (job_id,)).fetchone()
            self._run(tx, "DELETE FROM chunks WHERE job_id = ?", (job_id,))
            self._run(tx, "DELETE FROM jobs WHERE id = ?", (job_id,))
        if row is not None:
            self._drop_audio(job_id, row[0])
        return job

    def counts(self) -> dict[str, int]:
        with self._transaction() as tx:
            rows = self._run(tx, "SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        out = dict.fromkeys(STATUSES, 0)
        out.update({s: n for s, n in rows})
        return out

    def words(self, job_id: str) -> list[dict]:
        with self._transaction() as tx:
            rows = self._run(tx, "SELECT words FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()
        return [w for (text,) in rows if text for w in json.loads(text)]

    def turns(self, job_id: str) -> list[tuple[float, float, int]] | None:
        with self._transaction() as tx:
            row = self._run(tx, "SELECT turns FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return [tuple(t) for t in json.loads(row[0])] if row and row[0] else None

    def chunk_owners(self, job_id: str) -> list[tuple[int, str | None, int]]:
        """(index, the owner whose words were kept, how many times it was claimed) per chunk."""
        with self._transaction() as tx:
            return [tuple(r) for r in self._run(
                tx, "SELECT idx, done_by, attempts FROM chunks WHERE job_id = ? ORDER BY idx", (job_id,)).fetchall()]

    def leases(self, job_id: str) -> list[tuple[int, str]]:
        """(index, owner) of each chunk of the job that a server holds, its words not in yet."""
        with self._transaction() as tx:
            return [tuple(r) for r in self._run(
                tx, "SELECT idx, owner FROM chunks WHERE job_id = ? AND words IS NULL AND owner IS NOT NULL "
                    "ORDER BY idx", (job_id,)).fetchall()]

    # -- whole-job steps: the cut and the finish ------------------------------
    def claim_step(self, owner: str) -> Job | None:
        """The oldest job that needs its cut (not cut yet) or its finish (every chunk done), leased to `owner`."""
        with self._transaction() as tx:
            row = self._run(tx, f"""
                SELECT j.id FROM jobs j
                WHERE j.status IN {ACTIVE} AND (j.owner IS NULL OR j.lease_until < {{now}})
                  AND (j.audio_seconds IS NULL
                       OR NOT EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id AND c.words IS NULL))
                ORDER BY j.created_at LIMIT 1 {{skip:j}}""").fetchone()
            if row is None:
                return None
            self._run(tx, "UPDATE jobs SET owner = ?, lease_until = {now} + ?, status = 'running', "
                          "started_at = COALESCE(started_at, ?) WHERE id = ?",
                      (owner, self.lease_seconds, time.time(), row[0]))
        return self.get(row[0])

    def set_chunks(self, job_id: str, owner: str, seconds: float, spans: list[tuple[float, float]]) -> bool:
        """Record the file's length and its chunks, and hand the job lease back. False: not ours any more."""
        with self._transaction() as tx:
            if self._run(tx, "UPDATE jobs SET audio_seconds = ?, owner = NULL, lease_until = NULL "
                             "WHERE id = ? AND owner = ? AND audio_seconds IS NULL",
                         (seconds, job_id, owner)).rowcount != 1:
                return False
            for i, (a, b) in enumerate(spans):
                self._run(tx, 'INSERT INTO chunks (job_id, idx, start, "end", attempts) VALUES (?, ?, ?, ?, 0)',
                          (job_id, i, a, b))
        return True

    def finish(self, job_id: str, owner: str, turns: list[tuple[float, float, int]] | None = None) -> bool:
        """`done`, once: only for the step's owner and only with every chunk's words in."""
        with self._transaction() as tx:
            return self._run(tx, f"""
                UPDATE jobs SET status = 'done', finished_at = ?, turns = ?, owner = NULL, lease_until = NULL
                WHERE id = ? AND owner = ? AND status IN {ACTIVE}
                  AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = ? AND c.words IS NULL)""",
                (time.time(), json.dumps(turns) if turns is not None else None, job_id, owner, job_id)).rowcount == 1

    def fail(self, job_id: str, error: str) -> None:
        with self._transaction() as tx:
            self._run(tx, f"UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, owner = NULL, "
                          f"lease_until = NULL WHERE id = ? AND status IN {ACTIVE}", (time.time(), error, job_id))

    # -- chunks ---------------------------------------------------------------
    def claimable(self) -> bool:
        """Whether any chunk is waiting for a server (cheap: a device loads its models only if so)."""
        with self._transaction() as tx:
            return self._run(tx, f"""
                SELECT 1 FROM chunks c JOIN jobs j ON j.id = c.job_id
                WHERE j.status IN {ACTIVE} AND c.words IS NULL AND (c.owner IS NULL OR c.lease_until < {{now}})
                LIMIT 1""").fetchone() is not None

    def claim_chunks(self, owner: str, n: int) -> list[Chunk]:
        """Up to `n` unfinished chunks nobody holds, oldest job first, in order, leased to `owner`."""
        if n <= 0:
            return []
        with self._transaction() as tx:
            rows = self._run(tx, f"""
                SELECT c.job_id, c.idx, c.start, c."end", c.owner FROM chunks c JOIN jobs j ON j.id = c.job_id
                WHERE j.status IN {ACTIVE} AND c.words IS NULL AND (c.owner IS NULL OR c.lease_until < {{now}})
                ORDER BY j.created_at, c.idx LIMIT ? {{skip:c}}""", (n,)).fetchall()
            for job_id, idx, *_ in rows:
                self._run(tx, "UPDATE chunks SET owner = ?, lease_until = {now} + ?, attempts = attempts + 1 "
                              "WHERE job_id = ? AND idx = ?", (owner, self.lease_seconds, job_id, idx))
            for job_id in {r[0] for r in rows}:
                self._run(tx, "UPDATE jobs SET status = 'running', started_at = COALESCE(started_at, ?) "
                              "WHERE id = ? AND status IN ('queued', 'paused')", (time.time(), job_id))
        return [Chunk(j, i, a, b, taken_over=prev is not None) for j, i, a, b, prev in rows]

    def chunk_done(self, chunk: Chunk, owner: str, words: list[dict]) -> bool:
        """Store a chunk's words. Refused (False) unless `owner` still holds its lease: a server that lost
        it (its lease ran out and another took the chunk, or the job was deleted) writes nothing."""
        with self._transaction() as tx:
            return self._run(tx, """
                UPDATE chunks SET words = ?, done_by = owner, owner = NULL, lease_until = NULL
                WHERE job_id = ? AND idx = ? AND owner = ? AND words IS NULL AND lease_until >= {now}""",
                (json.dumps(words), chunk.job_id, chunk.idx, owner)).rowcount == 1

    def pending(self, job_id: str) -> int:
        with self._transaction() as tx:
            return self._run(tx, "SELECT COUNT(*) FROM chunks WHERE job_id = ? AND words IS NULL",
                             (job_id,)).fetchone()[0]

    def release_chunks(self, owner: str, chunks: list[Chunk]) -> None:
        """Hand chunks back unfinished (a device that filled with live streams), for any server to take."""
        with self._transaction() as tx:
            for c in chunks:
                self._run(tx, "UPDATE chunks SET owner = NULL, lease_until = NULL, attempts = attempts - 1 "
                              "WHERE job_id = ? AND idx = ? AND owner = ? AND words IS NULL",
                          (c.job_id, c.idx, owner))

    def pause_if_idle(self, job_id: str) -> None:
        """Show `paused` while nobody (on any server) works on the job."""
        with self._transaction() as tx:
            self._run(tx, """
                UPDATE jobs SET status = 'paused' WHERE id = ? AND status = 'running' AND owner IS NULL
                  AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = ? AND c.words IS NULL
                                  AND c.owner IS NOT NULL AND c.lease_until >= {now})""", (job_id, job_id))

    def next_waiting(self) -> str | None:
        """The oldest job with chunks waiting for a server."""
        with self._transaction() as tx:
            row = self._run(tx, f"""
                SELECT j.id FROM jobs j WHERE j.status IN {ACTIVE} AND j.audio_seconds IS NOT NULL
                  AND EXISTS (SELECT 1 FROM chunks c WHERE c.job_id = j.id AND c.words IS NULL)
                ORDER BY j.created_at LIMIT 1""").fetchone()
        return row[0] if row else None

    # -- leases ---------------------------------------------------------------
    def renew(self, owner: str) -> int:
        """The heartbeat: every lease `owner` holds runs `lease_seconds` from now. Returns how many."""
        with self._transaction() as tx:
            n = self._run(tx, "UPDATE chunks SET lease_until = {now} + ? WHERE owner = ? AND words IS NULL",
                          (self.lease_seconds, owner)).rowcount
            n += self._run(tx, "UPDATE jobs SET lease_until = {now} + ? WHERE owner = ?",
                           (self.lease_seconds, owner)).rowcount
        return n

    def release_owner(self, owner: str) -> None:
        """A server stopping cleanly hands back everything it holds, for the others (or its restart)."""
        with self._transaction() as tx:
            self._run(tx, "UPDATE chunks SET owner = NULL, lease_until = NULL WHERE owner = ? AND words IS NULL",
                      (owner,))
            self._run(tx, "UPDATE jobs SET owner = NULL, lease_until = NULL WHERE owner = ?", (owner,))

    def release_dead(self, me: str, alive: Callable[[str], bool]) -> list[str]:
        """At start-up: hand back the leases of earlier owners `alive` says are gone (a server on this host
        killed with -9, then restarted), instead of waiting for them to run out. Returns those owners."""
        with self._transaction() as tx:
            owners = {r[0] for r in self._run(
                tx, "SELECT DISTINCT owner FROM chunks WHERE owner IS NOT NULL AND words IS NULL "
                    "UNION SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL").fetchall()}
        dead = sorted(o for o in owners if o != me and not alive(o))
        for owner in dead:
            self.release_owner(owner)
        return dead


def new_owner() -> str:
    """This server process's name in leases: host, pid and a nonce (a restarted container may reuse a pid)."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def owner_alive(owner: str, me: str) -> bool:
    """False only for an owner this host can tell is gone: same host, and its pid is not running or is
    ours under another nonce. Owners on other hosts are alive until their leases say otherwise."""
    try:
        host, pid, _ = owner.rsplit(":", 2)
        my_host, my_pid, _ = me.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return True
    if host != my_host:
        return True
    if pid == my_pid:
        return False  # our own pid under another nonce: a previous life of this container
    try:
        os.kill(pid_n, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_SELECT = (
    "SELECT j.id, j.status, j.created_at, j.started_at, j.finished_at, j.audio_seconds, "
    "j.language, j.prompt, j.diarization, j.error, COUNT(c.idx), COUNT(c.words) "
    "FROM jobs j LEFT JOIN chunks c ON c.job_id = j.id"
)


def _job(row) -> Job:
    return Job(*row[:8], bool(row[8]), row[9], row[10], row[11])


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql://", "postgres://"))


def open_store(url: str, files: Path, lease_seconds: float = LEASE_SECONDS) -> JobStore:
    """The store `--jobs-db` names: a `postgresql://` URL, or a SQLite file path.

    `files`: a local folder for audio (SQLite keeps uploads there; PostgreSQL only
    stages them there while one is decoded)."""
    if is_postgres(url):
        from .postgres_store import PostgresJobStore

        return PostgresJobStore(url, files, lease_seconds)
    from .sqlite_store import SQLiteJobStore

    return SQLiteJobStore(url, files, lease_seconds)
