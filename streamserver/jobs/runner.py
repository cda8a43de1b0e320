"""Runs the queued file jobs, one at a time, chunk by chunk, on every device at once.

For the oldest unfinished job: decode the file and cut it at speech pauses into
chunks of at most 15 s (once; the cut is stored), then one worker per device takes
unfinished chunks and hands them to that device's scheduler as file work
(`submit_batch`): they run only in capacity live streams leave. A device takes as
many chunks at once as its scheduler's `file_slots`, so they batch where file
rounds stay short and go one by one where they do not. Each chunk's words are
stored as soon as it is done, so a restarted server resumes at the first
unfinished chunk. While every device's live load holds file work back, the job
shows `paused`.
"""
from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.asr_types import TranscribeJob
from backends.vad import SileroVAD

from .file_audio import SAMPLE_RATE, FileDecodeError, cut_at_pauses, decode_file, speaker_turns
from .store import Job, JobStore
from ..scheduler import RETRY_SECONDS

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("streamserver.jobs")

# Files are cut at pauses into chunks of 7.5-15 s: the unit stored (and resumed) and the unit batched.
# Half of Whisper's 30-s window: twice as many rows to batch, and one chunk is a short round beside live
# streams (0.4 s for tiny.en on a 2-core CPU). Measured there on the engine alone, 15-s chunks eight to a
# batch did 54 audio seconds per second against 24 for 30-s chunks one at a time, with the same words.
CHUNK_SECONDS = 15.0


class JobRunner:
    def __init__(self, server: Server, db_path: str, chunk_seconds: float = CHUNK_SECONDS) -> None:
        self.server = server
        self.db_path = db_path
        self._store: JobStore | None = None
        self.chunk_seconds = chunk_seconds
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._current: tuple[str, asyncio.Task] | None = None
        self._vad: SileroVAD | None = None  # on the CPU: cutting files never takes device time
        self._stopping = False
        self._diarizer = None
        self.audio_seconds_done = 0.0

    @property
    def store(self) -> JobStore:
        """The job database, opened on first use (a server that never gets a file writes none)."""
        if self._store is None:
            self._store = JobStore(self.db_path)
            if self.server.metrics is not None:
                self.server.metrics.attach_jobs(self._store)
        return self._store

    @property
    def uploads(self) -> Path:
        folder = Path(self.db_path + ".files")
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def start(self) -> None:
        if os.path.exists(self.db_path):  # jobs of an earlier run: resume them
            requeued = self.store.requeue_interrupted()
            if requeued:
                log.info("Resuming %d interrupted job(s)", requeued)
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._store is not None:
            self._store.close()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> None:
        """A deleted job stops at once: its workers are cancelled, its queued chunks dropped."""
        if self._current and self._current[0] == job_id:
            self._current[1].cancel()

    async def wait_done(self, job_id: str, poll: float = 0.2) -> Job | None:
        while True:
            job = self.store.get(job_id)
            if job is None or job.status in ("done", "failed"):
                return job
            await asyncio.sleep(poll)

    # -- the loop ----------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            job = self.store.next_queued() if self._store is not None else None
            if job is None:
                self._wake.clear()
                try:
                    async with asyncio.timeout(1.0):
                        await self._wake.wait()
                except TimeoutError:
                    pass
                continue
            task = asyncio.ensure_future(self._run(job))
            self._current = (job.id, task)
            try:
                await task
            except asyncio.CancelledError:
                if self._stopping or not task.cancelled():
                    raise  # the server is stopping: the job stays running in the store and resumes later
                log.info("Job %s cancelled", job.id)
            finally:
                self._current = None

    async def _run(self, job: Job) -> None:
        self.store.set_status(job.id, "running")
        try:
            audio = await asyncio.to_thread(decode_file, job.audio_path)
            if not self.store.pending_chunks(job.id) and not job.chunks:
                spans = await asyncio.to_thread(cut_at_pauses, audio, self._cpu_vad(), self.chunk_seconds,
                                                self.chunk_seconds / 2)
                self.store.set_chunks(job.id, len(audio) / SAMPLE_RATE, spans)
            pending = asyncio.Queue()
            for chunk in self.store.pending_chunks(job.id):
                pending.put_nowait(chunk)
            workers = [asyncio.ensure_future(self._worker(job, audio, pending, rt))
                       for rt in self.server.runtimes.values()]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
            if job.diarization and self.store.turns(job.id) is None:
                turns = await asyncio.to_thread(speaker_turns, audio, self._cpu_diarizer(), self._cpu_vad())
                self.store.set_turns(job.id, turns)
        except FileDecodeError as exc:
            self.store.set_status(job.id, "failed", str(exc))
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a job's failure is the job's, the server goes on
            log.exception("Job %s failed", job.id)
            self.store.set_status(job.id, "failed", f"{type(exc).__name__}: {exc}"[:300])
            return
        if self.store.get(job.id) is not None:
            self.store.set_status(job.id, "done")
            log.info("Job %s done", job.id)

    async def _worker(self, job: Job, audio: np.ndarray, pending: asyncio.Queue, runtime) -> None:
        """Feeds one device chunks of the job, as many at once as its scheduler's `file_slots` allow.

        A device whose live load holds file work back takes no new chunks, and hands the ones still
        waiting in its scheduler back to the queue when another device can run them: a long file
        goes to the devices with room instead of waiting on a busy one."""
        models = await runtime.acquire()  # loads the device's models if needed; keeps them loaded
        scheduler = runtime.scheduler
        running: dict[asyncio.Task, tuple[tuple[int, float, float], TranscribeJob]] = {}
        try:
            while not pending.empty() or running:
                if not scheduler.batch_paused():
                    shared = self.server.allocator.active(runtime.device.id) > 0
                    while not pending.empty() and len(running) < scheduler.file_slots(shared):
                        chunk = pending.get_nowait()
                        request = TranscribeJob(audio[int(chunk[1] * SAMPLE_RATE):int(chunk[2] * SAMPLE_RATE)],
                                                "", job.language)
                        task = asyncio.ensure_future(self._chunk(job, chunk, request, runtime, shared))
                        running[task] = (chunk, request)
                else:
                    if all(rt.scheduler.batch_paused() for rt in self.server.runtimes.values()):
                        self.store.set_status(job.id, "paused")
                    elif running:
                        for task, (chunk, request) in list(running.items()):
                            if scheduler.withdraw(request):  # not begun here: let a free device have it
                                pending.put_nowait(chunk)
                if not running:
                    await asyncio.sleep(RETRY_SECONDS)
                    continue
                done, _ = await asyncio.wait(running, timeout=RETRY_SECONDS, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    del running[task]
                    if not task.cancelled() and not task.result():
                        return  # deleted meanwhile
        finally:
            for task in running:
                task.cancel()
            del models
            runtime.release()

    async def _chunk(self, job: Job, chunk: tuple[int, float, float], request: TranscribeJob, runtime,
                     shared: bool) -> bool:
        """One chunk through the device's file lane and into the store; False if the job is gone."""
        idx, start, end = chunk
        segments = await runtime.scheduler.submit_batch(request, shared)
        words = [{"word": w.text, "start": round(start + w.start, 3), "end": round(start + w.end, 3)}
                 for s in segments for w in s.words]
        if not self.store.chunk_done(job.id, idx, words):
            return False
        self.audio_seconds_done += end - start
        if self.server.metrics is not None:
            self.server.metrics.file_audio(runtime.device.id, end - start)
        self.store.set_status(job.id, "running")
        return True

    def _cpu_diarizer(self):
        """The offline speaker-embedding diarizer, on the CPU (files never wait for a device's)."""
        if self._diarizer is None:
            from backends.embedding_diarizer import EmbeddingDiarizer

            self._diarizer = EmbeddingDiarizer("cpu")
        return self._diarizer

    def _cpu_vad(self) -> SileroVAD:
        if self._vad is None:
            self._vad = SileroVAD("cpu")
        return self._vad
