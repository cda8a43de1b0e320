"""DeviceScheduler: one device's inference in rounds, batched across its connections.

A connection hands in one session step at a time (`submit`) and waits for its
caption state. A round takes every step waiting at its start, runs them all on
the device's worker thread, and answers their Whisper calls together:

    start each step; it runs until it needs a model and yields the job
    → answer all jobs of that wave by kind in batches (`VadJob`s in one
      `probabilities_batch`, `TranscribeJob`s in `transcribe_batch` calls)
    → send each step its answer; repeat until every step has returned.

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
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backends.asr_types import Segment, Steps, TranscribeJob
from backends.vad import VadJob

from .errors import is_out_of_memory

if TYPE_CHECKING:
    from .runtime import DeviceRuntime

log = logging.getLogger("streamserver.scheduler")


@dataclass
class _Request:
    steps: Steps
    future: asyncio.Future
    submitted: float


@dataclass
class _Progress:
    """Where one step of the round stands: asking (`job`), done (`value`) or failed (`error`)."""

    job: TranscribeJob | VadJob | None = None
    value: Any = None
    error: BaseException | None = None


class DeviceScheduler:
    def __init__(self, runtime: DeviceRuntime, max_batch: int = 32) -> None:
        self.runtime = runtime
        self.max_batch = max(1, max_batch)
        self._waiting: list[_Request] = []
        self._running = False
        self.rounds = 0
        self.last_round_size = 0

    async def submit(self, steps: Steps) -> Any:
        """Run a session's `step()`/`finish()` generator in the next round; its return value."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(_Request(steps, future, time.perf_counter()))
        loop.call_soon(self._start_round)  # steps submitted in the same tick share the round
        return await future

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    # -- event loop side ------------------------------------------------
    def _start_round(self) -> None:
        if self._running or not self._waiting:
            return
        requests, self._waiting = self._waiting, []
        self._running = True
        models = self.runtime.models
        task = asyncio.ensure_future(self.runtime.run(self._round, models, requests))
        task.add_done_callback(lambda t: self._round_done(t, requests))

    def _round_done(self, task: asyncio.Future, requests: list[_Request]) -> None:
        self._running = False
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
        self._start_round()

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
            vad = [i for i in asking if isinstance(progress[i].job, VadJob)]
            asr = [i for i in asking if not isinstance(progress[i].job, VadJob)]
            answers = dict(zip(vad, self._vad(models, [progress[i].job for i in vad], started)))
            answers.update(zip(asr, self._transcribe(models.asr, [progress[i].job for i in asr], started)))
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
        try:
            batch = getattr(models.vad, "probabilities_batch", None)
            if batch is not None:
                return list(batch([j.state for j in jobs], [j.audio for j in jobs]))
            return [models.vad.probabilities(j.state, j.audio) for j in jobs]
        except Exception as exc:  # noqa: BLE001 - a failure becomes the affected streams' error
            return [exc] * len(jobs)

    def _transcribe(self, asr: Any, jobs: list[TranscribeJob], started: float) -> list[list[Segment] | BaseException]:
        out: list[list[Segment] | BaseException] = []
        if not jobs:
            return out
        for k in range(0, len(jobs), self.max_batch):
            out += self._batch(asr, jobs[k:k + self.max_batch], started)
        return out

    def _batch(self, asr: Any, jobs: list[TranscribeJob], started: float) -> list[list[Segment] | BaseException]:
        """One batched Whisper call; out of memory, it halves the batch and tries again,
        so only a stream that cannot run even alone gets the error."""
        metrics, gpu_id = self.runtime.metrics, self.runtime.device.id
        if metrics is not None:
            wait = time.perf_counter() - started
            metrics.observe_batch(gpu_id, "encoder", len(jobs), wait)
            metrics.observe_batch(gpu_id, "decoder", len(jobs), wait)
        try:
            return list(asr.transcribe_batch(jobs))
        except Exception as exc:  # noqa: BLE001 - a failure becomes the affected streams' error
            if is_out_of_memory(exc) and len(jobs) > 1:
                _free_cached(asr)
                half = len(jobs) // 2
                log.warning("Out of memory on GPU %d with a batch of %d streams; retrying in halves",
                            gpu_id, len(jobs))
                return self._batch(asr, jobs[:half], started) + self._batch(asr, jobs[half:], started)
            return [exc] * len(jobs)


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
