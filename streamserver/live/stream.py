"""One live stream's work, whatever wire protocol it came in on.

A `LiveStream` holds its device slot (taken by `admission`), its session on the
device scheduler, and its newest state; it frees all of them exactly once, in
`close()`. Protocol adapters (`streamserver/protocols/`) own the socket: they feed
decoded audio in (`feed`, `end`, `cut`) and take states out of `updates`, a slot
that keeps only the newest one, so a slow client gets fewer updates, never a
growing queue. Viewers (`viewers.py`) each get a slot of their own (`watch`). The
stream's processing task does not belong to a socket: a dropped `/asr` client can
come back to the same stream (`resume.py`), and its viewers stay.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import deque
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from gpu_manager import Device

from ..errors import ConnectionFailure, GpuOutOfMemory, is_out_of_memory
from .policy import SAMPLE_RATE
from .session import AudioInbox, Session, SessionOptions
from .stream_meter import StreamMeter
from .captions import CaptionState

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("gpu_manager")

HEARTBEAT_SECONDS = 1.0


@dataclass(frozen=True)
class StreamUpdate:
    """A state of the stream and how much audio had arrived when it was taken. `final`: the last one
    (everything committed); `drained`: the server ended the stream, not the client."""

    state: CaptionState
    received_seconds: float
    final: bool = False
    drained: bool = False


class UpdateSlot:
    """The single newest update waiting for a sender; `put` replaces what is there. After `close`
    (the stream went away), `take` answers what is left, then None."""

    def __init__(self) -> None:
        self._value: StreamUpdate | None = None
        self._event = asyncio.Event()
        self._closed = False

    def put(self, value: StreamUpdate) -> None:
        self._value = value
        self._event.set()

    def close(self) -> None:
        self._closed = True
        self._event.set()

    async def take(self) -> StreamUpdate | None:
        await self._event.wait()
        if not self._closed:
            self._event.clear()
        value, self._value = self._value, None
        return value


class LiveStream:
    def __init__(self, server: Server, device: Device, stream_id: str, options: SessionOptions) -> None:
        self.server = server
        self.device = device
        self.id = stream_id
        self.options = options
        self.runtime = server.runtimes[device.id]
        self.inbox = AudioInbox()
        self.updates = UpdateSlot()
        self.viewer_key = secrets.token_urlsafe(24)  # opens /asr/watch/<id>; not the resume token
        self.viewers: set[UpdateSlot] = set()
        self.meter = StreamMeter(server.metrics, device.id)
        self.latest: StreamUpdate | None = None  # the newest state (a resumed client gets it first)
        self.received_bytes = 0  # what the client sent, as it sent it (before decoding)
        self.ended = False  # the client's end of stream
        self.draining = False  # the server asked the stream to finish
        self.aborted = asyncio.Event()  # the drain's grace period ran out
        self._arrived = asyncio.Event()
        self._cuts: deque[int] = deque()  # where the client cut: the inbox's received_samples then
        self.parked = False  # its client dropped and may come back (resume.py)
        self._task: asyncio.Task | None = None
        self._session: Session | None = None
        self._retune: dict = {}
        self.closed = False

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> None:
        self.server.drain.register(self)
        self.server.viewers.add(self)
        self._task = asyncio.create_task(self._run())

    async def wait(self) -> None:
        """Until the stream's work is over (its final update is in `updates`); re-raises its failure.
        Cancelling the waiter does not cancel the stream."""
        assert self._task is not None
        await asyncio.shield(self._task)

    @property
    def finished(self) -> bool:
        return self._task is not None and self._task.done()

    async def close(self) -> None:
        """Stop the work if it still runs and free the slot and the drain's registration (once)."""
        if self.closed:
            return
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.server.drain.unregister(self)
        self.server.viewers.remove(self)
        for slot in self.viewers:
            slot.close()
        self.server.allocator.release(self.id)

    # -- viewers (viewers.py) ---------------------------------------------------
    def watch(self, limit: int) -> UpdateSlot | None:
        """A slot of the stream's updates for a viewer (the newest state first); None with `limit`
        viewers already, or once the stream is closed."""
        if self.closed or len(self.viewers) >= limit:
            return None
        slot = UpdateSlot()
        if self.latest is not None:
            slot.put(self.latest)
        self.viewers.add(slot)
        return slot

    def unwatch(self, slot: UpdateSlot) -> None:
        self.viewers.discard(slot)

    # -- input (event loop) -------------------------------------------------
    def feed(self, audio: np.ndarray, raw_bytes: int = 0) -> None:
        self.received_bytes += raw_bytes
        self.inbox.put(audio)
        if audio.size:
            self.meter.audio_in(audio.size / SAMPLE_RATE, self.inbox.received_seconds)
        self._arrived.set()

    def end(self) -> None:
        """The client's end of stream: finish everything held, then the final update."""
        self.ended = True
        self._arrived.set()

    def cut(self) -> None:
        """The client wants what it said so far now: the utterance under way is committed, and it
        ends where the audio the client had sent ends (not where the inbox is when the step runs)."""
        self._cuts.append(self.inbox.received_samples)
        self._arrived.set()

    def retune(self, **settings) -> None:
        """Change the session's language, utterance pause or prompt (`Session.retune`) from now on."""
        self._retune.update({k: v for k, v in settings.items() if v is not None})
        if self._session is not None:
            self._session.retune(**settings)

    # -- drain (see drain.py) -----------------------------------------------
    def begin_drain(self) -> None:
        """Finish as at the end of stream; the adapter closes with its protocol's going-away. A stream
        whose client is gone (parked for a resume) just ends."""
        self.draining = True
        self._arrived.set()
        if self.parked:
            asyncio.ensure_future(self.close())

    def abort(self) -> None:
        """The drain's grace period is over: the adapter ends the socket now, with an error."""
        self.aborted.set()

    # -- the work -------------------------------------------------------------
    async def _run(self) -> None:
        models = await self.runtime.acquire()
        try:
            self.server.memory.account.add_stream(self.device.id, self.id, models.stream_bytes)
            session = self._session = Session(self.inbox, models, self.options)
            session.retune(**self._retune)
            while not (self.ended or self.draining):
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                    # that lands as the event fires, and the stream would never end.
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        await self._arrived.wait()
                except TimeoutError:
                    continue
                self._arrived.clear()
                if self._cuts:  # each cut in its own step, each answered (Finalize, commit) on its own
                    while self._cuts:
                        self._publish(await self._infer(partial(session.cut, self._cuts.popleft())))
                else:
                    self._publish(await self._infer(session.step))
                if session.ending_pending:  # the turn ends with its ending checked: next round, audio or not
                    self._arrived.set()
            final = await self._infer(lambda: session.finish(check_ending=False))
            if session.ending_pending:  # the words first, then what a free decode hears after them
                self._publish(final)
                final = await self._infer(session.finish_ending)
            self._publish(final, final=True, drained=not self.ended)
        finally:
            self.server.memory.account.remove_stream(self.device.id, self.id)
            self.runtime.release()

    def _publish(self, state: CaptionState, final: bool = False, drained: bool = False) -> None:
        self.latest = StreamUpdate(state, self.inbox.received_seconds, final, drained)
        self.updates.put(self.latest)
        for slot in self.viewers:
            slot.put(self.latest)

    async def _infer(self, steps) -> CaptionState:
        """Run a session step in the device scheduler's next round, and record what it did in the metrics."""
        inbox = self.inbox

        def job():
            received = inbox.received_seconds  # before the step: it takes in at least this much
            state = yield from steps()
            return state, received

        try:
            state, received = await self.runtime.scheduler.submit(job())
        except ConnectionFailure:
            raise
        except Exception as exc:
            if is_out_of_memory(exc):
                raise GpuOutOfMemory(self.device.id) from exc
            raise
        self.meter.step_done(state, received)
        return state
