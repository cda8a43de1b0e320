"""DeviceScheduler: one device's inference in rounds, batched across its connections.

A connection hands in one session step at a time (`submit`) and waits for its
caption state. A round takes every step waiting at its start, runs them all on
the device's worker thread, and answers their Whisper calls together:

    start each step; it runs until it needs a model and yields the job
    → answer all jobs of that wave by kind in batches (`VadJob`s in one
      `probabilities_batch`, `DiarizeJob`s in one `process_batch`,
      `TranscribeJob`s in `transcribe_batch` calls); a `DecodeNow` (a step that
      could decode early) is answered first: yes when another step of the wave
      asks for a decode, so that its decode joins that batch)
    → send each step its answer; repeat until every step has returned.

File chunks (`submit_batch`) are a second, lower class: a round of them runs
only when no live step is waiting, the device is not full of live connections,
and live rounds have used less than half of the device time that file rounds
left over the last five seconds; otherwise they wait (the job shows `paused`)
and are looked at again every half second. Waiting chunks share a round (up to
--max-batch); `file_slots` tells the job runner how many to keep in flight so
that a file round stays short.

Each connection has at most one step in flight, so every round serves every
waiting connection once: no stream starves, and when the device falls behind
real time each stream gets fewer, larger updates (its audio waits in its inbox)
instead of a queue that grows without bound. The scheduler owns no models; it
drives the sessions' steps and the device's shared ASR (vLLM's engine/scheduler
split: the session owns the request, the scheduler decides what runs, the model
runs it).
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from backends.asr_types import DecodeNow, Segment, Steps, TranscribeJob, TranscribeTogether
from backends.diarization_types import DiarizeJob
from backends.vad import VadJob

from ..errors import is_out_of_memory

if TYPE_CHECKING:
    from .runtime import DeviceRuntime

log = logging.getLogger("streamserver.engine.scheduler")

BUSY_WINDOW = 5.0  # seconds over which the live streams' share of the device is measured
PAUSE_DUTY = 0.5  # file work pauses while live rounds fill more than this share
RETRY_SECONDS = 0.5  # how often paused file work looks again
MIN_SPAN = 0.5  # seconds: a single short live round does not read as a busy device
FILE_GRACE = 0.05  # seconds after a live round in which its streams get to ask again before file work
# The longest a file round should take (on an idle device / beside live streams): a live step that arrives
# meanwhile waits for it. File batches grow while rounds stay under half of this and shrink above it.
FILE_ROUND_SECONDS = {False: 1.0, True: 0.5}
RESUME_AFTER = 2.0  # seconds file work stays paused after live load last held it back (streams ending one by one)
# How long a live round waits, from its first step's arrival, for the device's other streams to hand
# in theirs (it starts at once when they all have). Each client sends a frame every 20-250 ms, each
# frame starting a round of its own: a device of several streams ran each one's decode in a round of
# its own, out of step with the others, and never batched them.
GATHER_SECONDS = 0.1


@dataclass
class _Request:
    steps: Steps
    future: asyncio.Future
    submitted: float


@dataclass
class _BatchRequest:
    """File work: one chunk's Whisper call, run only with capacity the live streams leave."""

    job: TranscribeJob
    future: asyncio.Future
    shared: bool = False  # submitted while live streams were on the device


@dataclass
class _Progress:
    """Where one step of the round stands: asking (`job`), done (`value`) or failed (`error`)."""

    job: TranscribeJob | VadJob | DiarizeJob | DecodeNow | None = None
    value: Any = None
    error: BaseException | None = None


class DeviceScheduler:
    def __init__(self, runtime: DeviceRuntime, max_batch: int = 32) -> None:
        self.runtime = runtime
        self.max_batch = max(1, max_batch)
        self._waiting: list[_Request] = []
        self._files: list[_BatchRequest] = []
        self._running = False
        self._retry: asyncio.TimerHandle | None = None
        self._live_rounds: deque[tuple[float, float]] = deque()  # (start, end) of recent live rounds
        self._file_rounds: deque[tuple[float, float]] = deque()  # (start, end) of recent file rounds
        self.rounds = 0
        self.last_round_size = 0
        self.batch_rounds = 0
        self.batch_audio_seconds = 0.0
        self._file_slots = {False: 1, True: 1}
        # Set by the server: whether the device holds as many live connections as it admits.
        self.is_full: Callable[[], bool] = lambda: False
        # Set by the server: how many live connections the device holds (a round waits for their steps).
        self.live_streams: Callable[[], int] = lambda: 1
        self._gather: asyncio.TimerHandle | None = None
        self._held_at = -math.inf  # when live load last held file work back

    async def submit(self, steps: Steps) -> Any:
        """Run a session's `step()`/`finish()` generator in the next round; its return value."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(_Request(steps, future, time.perf_counter()))
        loop.call_soon(self._start_round)  # steps submitted in the same tick share the round
        return await future

    async def submit_batch(self, job: TranscribeJob, shared: bool = False) -> list[Segment]:
        """Transcribe one chunk of a file when the live streams leave room (never before them);
        `shared`: live streams are on the device, so the round should stay short."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._files.append(_BatchRequest(job, future, shared))
        loop.call_soon(self._start_round)
        return await future

    def withdraw(self, job: TranscribeJob) -> bool:
        """Take back file work that has not begun (its `submit_batch` is cancelled); False if it has."""
        for request in self._files:
            if request.job is job and not request.future.done():
                self._files.remove(request)
                request.future.cancel()
                return True
        return False

    def file_slots(self, shared: bool) -> int:
        """How many file chunks to keep in flight on this device. It grows while file rounds stay short,
        so files batch where the device has room (a GPU), and shrinks when they get long (a 2-core CPU
        stays at one or two), so a live step never waits long behind a file round."""
        return self._file_slots[shared]

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def live_duty(self, now: float | None = None) -> float:
        """Share of the device's recent time not taken by file rounds (up to BUSY_WINDOW seconds,
        since the first live round in it) that live rounds used: near 1 as soon as live rounds run
        back to back, whether or not file rounds were slipped in between them."""
        now = time.perf_counter() if now is None else now
        files = _busy(self._file_rounds, now)
        return _duty(self._live_rounds, now, MIN_SPAN, minus=files)

    def batch_share(self) -> float:
        """Share of the last BUSY_WINDOW seconds the device spent on file work (for /gpu-status)."""
        return _duty(self._file_rounds, time.perf_counter(), BUSY_WINDOW)

    def batch_paused(self) -> bool:
        """File work waits while the device is full of live connections (the operator's measure of its
        capacity), or while live streams keep it busy more than PAUSE_DUTY of the time, and for
        RESUME_AFTER seconds after either: the last streams of a busy spell finish undisturbed."""
        now = time.perf_counter()
        if self.is_full() or self.live_duty(now) > PAUSE_DUTY:
            self._held_at = now
            return True
        return now - self._held_at < RESUME_AFTER

    # -- event loop side ------------------------------------------------
    def _start_round(self) -> None:
        """Live steps first; file chunks only when no live step waits and live load leaves room."""
        if self._running:
            return
        models = self.runtime.models
        if self._waiting:
            if self._gathering():
                return
            requests, self._waiting = self._waiting, []
            self._running = True
            started = time.perf_counter()
            task = asyncio.ensure_future(self.runtime.run(self._round, models, requests))
            task.add_done_callback(lambda t: self._round_done(t, requests, started))
            return
        self._files = [b for b in self._files if not b.future.done()]  # cancelled jobs free their work
        if not self._files or models is None:
            return
        since_live = time.perf_counter() - self._live_rounds[-1][1] if self._live_rounds else FILE_GRACE
        if since_live < FILE_GRACE:  # the streams just served have not asked again yet: let them first
            asyncio.get_running_loop().call_later(FILE_GRACE - since_live, self._start_round)
            return
        if self.batch_paused():
            if self._retry is None:
                self._retry = asyncio.get_running_loop().call_later(RETRY_SECONDS, self._retry_round)
            return
        batch, self._files = self._files[: self.max_batch], self._files[self.max_batch:]
        self._running = True
        started = time.perf_counter()
        task = asyncio.ensure_future(self.runtime.run(self._batch_round, models.asr, [b.job for b in batch]))
        task.add_done_callback(lambda t: self._batch_done(t, batch, started))

    def _gathering(self) -> bool:
        """Whether the next live round waits for more streams' steps (`GATHER_SECONDS`); a timer then
        starts it."""
        if self._gather is not None:
            self._gather.cancel()
            self._gather = None
        left = self._waiting[0].submitted + GATHER_SECONDS - time.perf_counter()
        if left <= 0 or len(self._waiting) >= self.live_streams():
            return False
        self._gather = asyncio.get_running_loop().call_later(left, self._start_round)
        return True

    def _retry_round(self) -> None:
        self._retry = None
        self._start_round()

    def _batch_done(self, task: asyncio.Future, batch: list[_BatchRequest], started: float) -> None:
        self._running = False
        ended = time.perf_counter()
        self._file_rounds.append((started, ended))
        self._adapt_file_slots(ended - started, len(batch), any(b.shared for b in batch))
        if task.cancelled() or task.exception() is not None:
            error = asyncio.CancelledError() if task.cancelled() else task.exception()
            answers = [error] * len(batch)
        else:
            answers = task.result()
        for request, answer in zip(batch, answers):
            if request.future.done():
                continue
            if isinstance(answer, BaseException):
                request.future.set_exception(answer)
            else:
                request.future.set_result(answer)
        self._start_round()

    def _adapt_file_slots(self, took: float, size: int, shared: bool) -> None:
        slots, target = self._file_slots[shared], FILE_ROUND_SECONDS[shared]
        if took > target and slots > 1:
            self._file_slots[shared] = max(1, min(slots, size) // 2)
        elif took < target / 2 and size >= slots:
            self._file_slots[shared] = min(self.max_batch, slots * 2)

    def _batch_round(self, asr: Any, jobs: list[TranscribeJob]) -> list[list[Segment] | BaseException]:
        started = time.perf_counter()
        self.batch_rounds += 1
        answers = self._transcribe(asr, jobs, started, file=True)
        self.batch_audio_seconds += sum(len(j.audio) for j in jobs) / 16000
        if self.runtime.metrics is not None:
            took = time.perf_counter() - started
            self.runtime.metrics.observe_compute(self.runtime.device.id, took)
            self.runtime.metrics.file_compute(self.runtime.device.id, took)
        return answers

    def _round_done(self, task: asyncio.Future, requests: list[_Request], started: float) -> None:
        self._running = False
        self._live_rounds.append((started, time.perf_counter()))
        if task.cancelled() or task.exception() is not None:
            error = asyncio.CancelledError() if task.cancelled() else task.exception()
            outcomes = [_Progress(error=error) for _ in requests]
        else:
            outcomes = task.result()
        for request, outcome in zip(requests, outcomes):
            if request.future.done():  # its connection went away meanwhile
                continue
            if outcome.error is not None:
                request.future.set_exception(outcome.error)
            else:
                request.future.set_result(outcome.value)
        # Not at once: the streams just answered hand in their next step as they wake (already queued
        # on the loop), and the next round takes them with the others. Started here, a round took only
        # the streams that had waited, the others waited a round in turn, and the device's streams
        # split into two groups whose rounds never shared a batch.
        asyncio.get_running_loop().call_soon(self._start_round)

    # -- worker thread side ---------------------------------------------
    def _round(self, models: Any, requests: list[_Request]) -> list[_Progress]:
        started = time.perf_counter()
        self.rounds += 1
        self.last_round_size = len(requests)
        metrics, gpu_id = self.runtime.metrics, self.runtime.device.id
        progress = [_advance(r.steps, None, first=True) for r in requests]
        while True:
            asking = [i for i, p in enumerate(progress) if p.job is not None]
            if not asking:
                break
            offers = [i for i in asking if isinstance(progress[i].job, DecodeNow)]
            if offers:  # answered first, so that streams that join decode in the same batch
                joining = any(isinstance(progress[i].job, (TranscribeJob, TranscribeTogether)) for i in asking)
                for i in offers:
                    progress[i] = _advance(requests[i].steps, joining)
                continue
            vad = [i for i in asking if isinstance(progress[i].job, VadJob)]
            diarize = [i for i in asking if isinstance(progress[i].job, DiarizeJob)]
            asr = [i for i in asking if not isinstance(progress[i].job, (VadJob, DiarizeJob))]
            answers = dict(zip(vad, self._vad(models, [progress[i].job for i in vad], started)))
            answers.update(zip(diarize, self._diarize(models, [progress[i].job for i in diarize], started)))
            answers.update(self._transcribe_asked(models.asr, [(i, progress[i].job) for i in asr], started))
            for i, answer in answers.items():
                if isinstance(answer, BaseException):
                    requests[i].steps.close()
                    progress[i] = _Progress(error=answer)
                else:
                    progress[i] = _advance(requests[i].steps, answer)
        if metrics is not None:
            metrics.observe_compute(gpu_id, time.perf_counter() - started)
        return progress

    def _vad(self, models: Any, jobs: list[VadJob], started: float) -> list[Any]:
        """Every stream's new audio through the VAD at once."""
        if not jobs:
            return []
        if self.runtime.metrics is not None:
            self.runtime.metrics.observe_batch(self.runtime.device.id, "vad", len(jobs), time.perf_counter() - started)
        cpu = time.process_time()
        try:
            batch = getattr(models.vad, "probabilities_batch", None)
            if batch is not None:
                return list(batch([j.state for j in jobs], [j.audio for j in jobs]))
            return [models.vad.probabilities(j.state, j.audio) for j in jobs]
        except Exception as exc:  # noqa: BLE001 - a failure becomes the affected streams' error
            return [exc] * len(jobs)
        finally:
            self._spent("vad", time.process_time() - cpu)

    def _diarize(self, models: Any, jobs: list[DiarizeJob], started: float) -> list[Any]:
        """Every stream's new audio through the device's diarizer at once (one speaker-encoder batch)."""
        if not jobs:
            return []
        if self.runtime.metrics is not None:
            self.runtime.metrics.observe_batch(self.runtime.device.id, "diarization", len(jobs),
                                               time.perf_counter() - started)
        cpu = time.process_time()
        try:
            return list(models.diarizer.process_batch(jobs))
        except Exception as exc:  # noqa: BLE001 - a failure becomes the affected streams' error
            return [exc] * len(jobs)
        finally:
            self._spent("diarization", time.process_time() - cpu)

    def _transcribe_asked(self, asr: Any, asked: list[tuple[int, Any]], started: float) -> dict[int, Any]:
        """The wave's Whisper jobs in batches, a step's `TranscribeTogether` among them (its jobs side by
        side, answered as a list); each step's answer, or the error of one of its jobs."""
        together = {i for i, job in asked if isinstance(job, TranscribeTogether)}
        parts = [(i, job.jobs if i in together else (job,)) for i, job in asked]
        results = self._transcribe(asr, [j for _, jobs in parts for j in jobs], started)
        answers: dict[int, Any] = {}
        at = 0
        for i, jobs in parts:
            part, at = results[at:at + len(jobs)], at + len(jobs)
            error = next((r for r in part if isinstance(r, BaseException)), None)
            answers[i] = error if error is not None else (part if i in together else part[0])
        return answers

    def _transcribe(self, asr: Any, jobs: list[TranscribeJob], started: float,
                    file: bool = False) -> list[list[Segment] | BaseException]:
        out: list[list[Segment] | BaseException] = []
        if not jobs:
            return out
        for k in range(0, len(jobs), self.max_batch):
            out += self._batch(asr, jobs[k:k + self.max_batch], started, file)
        return out

    def _batch(self, asr: Any, jobs: list[TranscribeJob], started: float,
               file: bool = False) -> list[list[Segment] | BaseException]:
        """One batched Whisper call; out of memory, it halves the batch and tries again,
        so only a stream that cannot run even alone gets the error."""
        metrics, gpu_id = self.runtime.metrics, self.runtime.device.id
        if metrics is not None:
            wait = time.perf_counter() - started
            metrics.observe_batch(gpu_id, "encoder", len(jobs), wait)
            metrics.observe_batch(gpu_id, "decoder", len(jobs), wait)
        cpu = time.process_time()
        try:
            answers = list(asr.transcribe_batch(jobs))
        except Exception as exc:  # noqa: BLE001 - a failure becomes the affected streams' error
            if is_out_of_memory(exc) and len(jobs) > 1:
                _free_cached(asr)
                half = len(jobs) // 2
                log.warning("Out of memory on GPU %d with a batch of %d streams; retrying in halves",
                            gpu_id, len(jobs))
                return self._batch(asr, jobs[:half], started, file) + self._batch(asr, jobs[half:], started, file)
            return [exc] * len(jobs)
        self._spent_on_asr(asr, jobs, time.process_time() - cpu, file)
        return answers

    def _spent_on_asr(self, asr: Any, jobs: list[TranscribeJob], seconds: float, file: bool) -> None:
        """A Whisper call's CPU by stage: a file round's is file work; a live round's is shared by its
        jobs, ending checks (`TranscribeJob` neither `again` nor `final`: the free decode after an
        utterance) taking their share, the rest split between encoder and decoder as the engine
        measured them (`last_cpu`)."""
        if file:
            self._spent("file", seconds)
            return
        checks = sum(1 for j in jobs if not j.again and not j.final)
        self._spent("ending_check", seconds * checks / len(jobs))
        rest = seconds * (len(jobs) - checks) / len(jobs)
        encoder, decoder = getattr(asr, "last_cpu", (0.0, 0.0))
        share = encoder / (encoder + decoder) if encoder + decoder > 0 else 0.0
        self._spent("encoder", rest * share)
        self._spent("decoder", rest * (1 - share))

    def _spent(self, stage: str, seconds: float) -> None:
        if self.runtime.metrics is not None:
            self.runtime.metrics.spent_cpu(self.runtime.device.id, stage, seconds)


def _busy(rounds: deque[tuple[float, float]], now: float) -> float:
    """Seconds of the last BUSY_WINDOW that `rounds` took (dropping older ones)."""
    while rounds and rounds[0][1] < now - BUSY_WINDOW:
        rounds.popleft()
    return max(0.0, sum(min(end, now) - max(start, now - BUSY_WINDOW) for start, end in rounds))


def _duty(rounds: deque[tuple[float, float]], now: float, min_span: float, minus: float = 0.0) -> float:
    """`rounds`' share of the span since the first of them (at most BUSY_WINDOW), less `minus` seconds."""
    busy = _busy(rounds, now)
    if not rounds:
        return 0.0
    span = max(min_span, now - max(rounds[0][0], now - BUSY_WINDOW) - minus)
    return min(1.0, busy / span)


def _advance(steps: Steps, answer: list[Segment] | None, first: bool = False) -> _Progress:
    try:
        job = next(steps) if first else steps.send(answer)
        return _Progress(job=job)
    except StopIteration as stop:
        return _Progress(value=stop.value)
    except Exception as exc:  # noqa: BLE001 - one session's failure is its own
        return _Progress(error=exc)


def _free_cached(asr: Any) -> None:
    device = getattr(asr, "device", None)
    if device is not None and getattr(device, "type", "") == "cuda":
        import torch

        torch.cuda.empty_cache()
