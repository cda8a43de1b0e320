"""This server's share of the file jobs: it claims work from the job store and runs it on its devices.

Three kinds of task, all pulling from the store, so one server or many sharing a
queue behave the same (the store's docstring says how leases keep them apart):

- the *step* task claims whole-job steps: cutting a new file at speech pauses
  into chunks of at most 15 s (decoded on the CPU, once), and finishing a job
  whose chunks are all in (its speaker turns, if asked for, then `done`);
- one *device* task per device claims chunks, as many at once as its
  scheduler's `file_slots`, and hands them to that device's scheduler as file
  work (`submit_batch`): they run only in capacity live streams leave. A device
  whose live load holds file work back claims nothing and hands back the chunks
  not yet begun, for any device of any server to take. Each chunk's words are
  stored the moment it is done, so a restarted or a surviving server carries on
  at the first unfinished chunk;
- the *heartbeat* renews this server's leases while it holds them.

While nobody can work on a job (every device held back by live streams), it
shows `paused`.
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.asr_types import TranscribeJob
from backends.vad import SileroVAD

from .file_audio import SAMPLE_RATE, FileDecodeError, cut_at_pauses, decode_file, speaker_turns
from .store import LEASE_SECONDS, Chunk, Job, JobStore, is_postgres, new_owner, open_store, owner_alive
from ..engine.scheduler import RETRY_SECONDS

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("streamserver.jobs")

# Files are cut at pauses into chunks of 7.5-15 s: the unit stored (and resumed) and the unit batched.
# Half of Whisper's 30-s window: twice as many rows to batch, and one chunk is a short round beside live
# streams (0.4 s for tiny.en on a 2-core CPU). Measured there on the engine alone, 15-s chunks eight to a
# batch did 54 audio seconds per second against 24 for 30-s chunks one at a time, with the same words.
CHUNK_SECONDS = 15.0
POLL_SECONDS = 0.5  # how often an idle server looks for work other servers queued
AUDIO_CACHE = 3  # decoded files kept in memory for their next chunks


class JobRunner:
    def __init__(self, server: Server, db_url: str, chunk_seconds: float = CHUNK_SECONDS,
                 lease_seconds: float = LEASE_SECONDS, files: Path | None = None) -> None:
        self.server = server
        self.db_url = db_url
        self.chunk_seconds = chunk_seconds
        self.lease_seconds = lease_seconds
        self.owner = new_owner()
        self.shared = is_postgres(db_url)
        self._files = files or (_staging_folder() if self.shared else Path(db_url + ".files"))
        self._store: JobStore | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._in_flight: dict[asyncio.Task, _InFlight] = {}
        self._audio: dict[str, asyncio.Future] = {}
        self._vad: SileroVAD | None = None  # on the CPU: cutting files never takes device time
        self._diarizer = None
        self._counts: dict[str, int] = {}
        self.audio_seconds_done = 0.0

    @property
    def store(self) -> JobStore:
        """The job store, opened on first use (a server that never gets a file writes none)."""
        if self._store is None:
            self._store = open_store(self.db_url, self._files, self.lease_seconds)
            if self.server.metrics is not None:
                self.server.metrics.attach_jobs(self)
        return self._store

    def check(self) -> None:
        """At start-up, for a shared queue: reach the database now (and create its tables), so a wrong
        URL or an unreachable server stops this one with a clear error instead of failing every job."""
        if not self.shared:
            return
        try:
            self.store  # noqa: B018
        except Exception as exc:  # noqa: BLE001 - the driver's own words say what is wrong
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ValueError(f"--jobs-db {_redacted(self.db_url)}: cannot use this PostgreSQL database: "
                             f"{reason}") from None

    @property
    def uploads(self) -> Path:
        """Where an upload lands while it arrives (then the store takes it over)."""
        self._files.mkdir(parents=True, exist_ok=True)
        return self._files

    def counts(self) -> dict[str, int]:
        """Jobs by status, as last read by the step task (a scrape never waits on the database)."""
        return dict(self._counts)

    async def db(self, method, *args):
        """A store call off the event loop (a shared database is a network round trip away)."""
        return await asyncio.to_thread(method, *args)

    def start(self) -> None:
        if self.shared or Path(self.db_url).exists():
            self.store  # noqa: B018 - an existing queue: take part at once
        self._tasks = [asyncio.ensure_future(self._steps()), asyncio.ensure_future(self._heartbeat())]
        self._tasks += [asyncio.ensure_future(self._device(rt)) for rt in self.server.runtimes.values()]

    async def stop(self) -> None:
        """Stop working and hand back every lease, so the other servers (or this one restarted) go on."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._store is not None:
            try:
                await self.db(self._store.release_owner, self.owner)
            except Exception:  # noqa: BLE001 - the database is gone: the leases run out by themselves
                log.warning("Could not hand back the job leases; they expire in %g s", self.lease_seconds)
            self._store.close()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """A deleted job stops at once here: its chunks in this server's devices are cancelled."""
        for task, work in list(self._in_flight.items()):
            if work.chunk.job_id == job_id:
                task.cancel()
        self._audio.pop(job_id, None)

    async def wait_done(self, job_id: str, poll: float = 0.2) -> Job | None:
        while True:
            job = await self.db(self.store.get, job_id)
            if job is None or job.status in ("done", "failed"):
                return job
            await asyncio.sleep(poll)

    async def _idle(self) -> None:
        """Until woken (a job came in here) or the poll interval passed (one may have come in elsewhere)."""
        self._wake.clear()
        try:
            async with asyncio.timeout(POLL_SECONDS if self._store is not None else 1.0):
                await self._wake.wait()
        except TimeoutError:
            pass

    # -- whole-job steps --------------------------------------------------
    async def _steps(self) -> None:
        if self._store is not None:
            dead = await self.db(self._store.release_dead, self.owner, lambda o: owner_alive(o, self.owner))
            if dead:
                log.info("Took back the job leases of %d stopped server(s) on this host", len(dead))
        while True:
            try:
                if self._store is None:
                    if not Path(self.db_url).exists():  # (another server on this machine may create it)
                        await self._idle()
                        continue
                    self.store  # noqa: B018 - a queue came into being: take part
                self._counts = await self.db(self._store.counts)
                job = await self.db(self._store.claim_step, self.owner)
                if job is None:
                    await self._mark_paused()
                    await self._idle()
                    continue
                await (self._finish(job) if job.cut else self._cut(job))
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a database hiccup: log, wait, go on
                log.exception("Job queue step failed; retrying")
                await asyncio.sleep(POLL_SECONDS * 4)

    async def _cut(self, job: Job) -> None:
        try:
            _, audio = await self._decoded(job.id)
        except FileDecodeError as exc:
            await self.db(self.store.fail, job.id, str(exc))
            return
        spans = await asyncio.to_thread(cut_at_pauses, audio, self._cpu_vad(), self.chunk_seconds,
                                        self.chunk_seconds / 2)
        if await self.db(self.store.set_chunks, job.id, self.owner, len(audio) / SAMPLE_RATE, spans):
            log.info("Job %s: %.0f s of audio in %d chunks", job.id, len(audio) / SAMPLE_RATE, len(spans))

    async def _finish(self, job: Job) -> None:
        turns = None
        if job.diarization:
            try:
                _, audio = await self._decoded(job.id)
            except FileDecodeError as exc:
                await self.db(self.store.fail, job.id, str(exc))
                return
            turns = await asyncio.to_thread(speaker_turns, audio, self._cpu_diarizer(), self._cpu_vad())
        if await self.db(self.store.finish, job.id, self.owner, turns):
            self._audio.pop(job.id, None)
            log.info("Job %s done", job.id)

    async def _mark_paused(self) -> None:
        """The oldest waiting job shows `paused` while every device here is held back and nobody else works on it."""
        if all(rt.scheduler.batch_paused() for rt in self.server.runtimes.values()):
            job_id = await self.db(self.store.next_waiting)
            if job_id is not None:
                await self.db(self.store.pause_if_idle, job_id)

    # -- chunks on one device ---------------------------------------------
    async def _device(self, runtime) -> None:
        """Feeds one device chunks, as many at once as its scheduler's `file_slots` allow.

        It holds a backlog of as many claimed chunks again, so that when a round returns, the next
        chunks go to the scheduler in the same tick and batch together; the store's round trips (claims,
        writes) happen beside the device's work, never between its rounds."""
        backlog: deque[_InFlight] = deque()
        running: dict[asyncio.Task, _InFlight] = {}  # in the device's scheduler (or decoding first)
        holding = False  # whether this task counts as a user of the device's models
        scheduler = runtime.scheduler
        try:
            while True:
                try:
                    if self._store is not None and not scheduler.batch_paused():
                        shared = self.server.allocator.active(runtime.device.id) > 0
                        slots = scheduler.file_slots(shared)
                        free = slots - len(running)
                        if free > 0 and len(backlog) < free and (holding or await self.db(self._store.claimable)):
                            if not holding:
                                await runtime.acquire()  # loads the device's models if needed; keeps them
                                holding = True
                            await self._claim(backlog, free + slots - len(backlog))
                        if holding:  # one wave: every chunk that fits goes in the same tick, so they batch
                            for _ in range(min(free, len(backlog))):
                                work = backlog.popleft()
                                task = asyncio.ensure_future(self._transcribe(work, runtime, shared))
                                running[task] = self._in_flight[task] = work
                            if running and len(backlog) < slots:  # the next wave, claimed while this one runs
                                await self._claim(backlog, slots - len(backlog))
                    elif running or backlog:
                        await self._hand_back(running, backlog, scheduler)
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - a model that will not load, a database hiccup
                    log.exception("Device %d: file work could not start; retrying", runtime.device.id)
                    await asyncio.sleep(POLL_SECONDS * 4)
                if not running:
                    if holding and not backlog:
                        runtime.release()
                        holding = False
                    if not backlog:
                        await self._idle()
                    else:
                        await asyncio.sleep(RETRY_SECONDS)
                    continue
                done, _ = await asyncio.wait(running, timeout=RETRY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    work = running.pop(task)
                    if task.cancelled():
                        self._in_flight.pop(task, None)
                    elif task.exception() is not None:
                        self._in_flight.pop(task, None)
                        error = f"{type(task.exception()).__name__}: {task.exception()}"[:300]
                        log.error("Job %s failed in chunk %d: %s", work.chunk.job_id, work.chunk.idx, error)
                        await self.db(self.store.fail, work.chunk.job_id, error)
                    elif task.result() is not None:
                        self._in_flight.pop(task, None)
                        write = asyncio.ensure_future(self._keep(work.chunk, task.result(), runtime.device.id))
                        self._in_flight[write] = work
                        write.add_done_callback(self._in_flight.pop)
        finally:
            for task in running:
                task.cancel()
                self._in_flight.pop(task, None)
            if backlog:
                await asyncio.shield(self.db(self.store.release_chunks, self.owner, [w.chunk for w in backlog]))
            if holding:
                runtime.release()

    async def _claim(self, backlog: deque[_InFlight], n: int) -> None:
        backlog.extend(_InFlight(c) for c in await self.db(self.store.claim_chunks, self.owner, n))

    async def _hand_back(self, running: dict[asyncio.Task, _InFlight], backlog: deque[_InFlight],
                         scheduler) -> None:
        """A device held back by live streams gives up the chunks it has not begun: any free device takes them."""
        back = [w.chunk for w in backlog]
        backlog.clear()
        for task, work in list(running.items()):
            if work.request is not None and scheduler.withdraw(work.request):
                back.append(work.chunk)
                del running[task]
                self._in_flight.pop(task, None)
                task.cancel()
        if back:
            await self.db(self.store.release_chunks, self.owner, back)

    async def _transcribe(self, work: _InFlight, runtime, shared: bool) -> list[dict] | None:
        """One chunk through the device's file lane: its words, in the file's time (None: job deleted)."""
        chunk = work.chunk
        if chunk.taken_over:
            log.info("Job %s: took over chunk %d (its server's lease ran out)", chunk.job_id, chunk.idx)
        try:
            job, audio = await self._decoded(chunk.job_id)
        except KeyError:
            return None
        work.request = TranscribeJob(audio[int(chunk.start * SAMPLE_RATE):int(chunk.end * SAMPLE_RATE)],
                                     "", job.language, whole_window=True)
        segments = await runtime.scheduler.submit_batch(work.request, shared)
        return [{"word": w.text, "start": round(chunk.start + w.start, 3), "end": round(chunk.start + w.end, 3)}
                for s in segments for w in s.words]

    async def _keep(self, chunk: Chunk, words: list[dict], device_id: int) -> None:
        """A chunk's words into the store, if this server still holds the chunk."""
        if not await self.db(self.store.chunk_done, chunk, self.owner, words):
            log.warning("Job %s: chunk %d's words refused (this server's lease on it was lost, or the job "
                        "was deleted)", chunk.job_id, chunk.idx)
            return
        self.audio_seconds_done += chunk.end - chunk.start
        if self.server.metrics is not None:
            self.server.metrics.file_audio(device_id, chunk.end - chunk.start)
        if await self.db(self.store.pending, chunk.job_id) == 0:
            self.wake()  # the step task finishes the job

    async def _decoded(self, job_id: str) -> tuple[Job, np.ndarray]:
        """The job and its whole file as 16 kHz samples, decoded once for all its chunks here.
        KeyError: the job is gone; FileDecodeError: its file is not audio."""
        future = self._audio.get(job_id)
        if future is None:
            future = self._audio[job_id] = asyncio.ensure_future(self._decode(job_id))
            while len(self._audio) > AUDIO_CACHE:
                self._audio.pop(next(iter(self._audio)))
        try:
            return await asyncio.shield(future)
        except BaseException:
            if future.done():
                self._audio.pop(job_id, None)
            raise

    async def _decode(self, job_id: str) -> tuple[Job, np.ndarray]:
        job = await self.db(self.store.get, job_id)
        if job is None:
            raise KeyError(job_id)

        def read() -> np.ndarray:
            with self.store.audio_file(job_id) as path:
                return decode_file(str(path))

        return job, await asyncio.to_thread(read)

    # -- leases -----------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Renew this server's leases every third of their length: a live server never loses one."""
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if self._store is None:
                continue
            try:
                await self.db(self._store.renew, self.owner)
            except Exception as exc:  # noqa: BLE001 - the next beat tries again
                log.warning("Could not renew the job leases: %s", exc)

    def _cpu_diarizer(self):
        """The offline speaker-embedding diarizer, on the CPU (files never wait for a device's)."""
        if self._diarizer is None:
            from backends.segmented_diarizer import load_embedding_diarizer

            self._diarizer = load_embedding_diarizer("cpu")
        return self._diarizer

    def _cpu_vad(self) -> SileroVAD:
        if self._vad is None:
            self._vad = SileroVAD("cpu")
        return self._vad


@dataclass
class _InFlight:
    """A claimed chunk in this server's hands; `request` once it has gone to the device's scheduler."""

    chunk: Chunk
    request: TranscribeJob | None = None


def _redacted(url: str) -> str:
    """The URL without its password, for messages and logs."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(":" + parts.password + "@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _staging_folder() -> Path:
    """A shared store keeps no files: uploads arrive here, decodes are staged here, both briefly."""
    import tempfile

    return Path(tempfile.gettempdir()) / "streamserver-jobs"
