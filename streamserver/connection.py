"""One `/asr` WebSocket, from admission to the last byte.

Three tasks per connection: the receiver (socket → decoder → inbox), the
processor (inbox → device worker → caption state) and the sender (one merging
"latest update" slot → socket, so a slow client gets fewer updates, never a
growing queue). Every way out — end of stream, client gone, bad input, server
failure, drain — releases the device slot and the model reference exactly once.

Before admission the socket is checked in the contract's order: origin, token,
(format), draining, capacity; a refusal is a close with no `config` message.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from gpu_manager import Device

from . import protocol
from .audio import FORMATS, AudioDecodeError, make_decoder
from .auth import origin_ok, token_ok
from .errors import (
    REFUSED_DRAINING,
    REFUSED_FULL,
    REFUSED_ORIGIN,
    REFUSED_UNAUTHORIZED,
    SHUTTING_DOWN,
    ConnectionFailure,
    DecodeFailed,
    FrameTooLarge,
    GpuOutOfMemory,
    InternalError,
    NotBinary,
    ShuttingDown,
    is_out_of_memory,
)
from .policy import SAMPLE_RATE
from .protocol import CaptionState
from .server import Server
from .session import AudioInbox, Session, SessionOptions
from .stream_meter import StreamMeter

log = logging.getLogger("gpu_manager")
errlog = logging.getLogger("streamserver.connection")

HEARTBEAT_SECONDS = 1.0
# `--refuse-when-full http`: how long a client or proxy is asked to wait before trying this server again.
RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True)
class Final:
    """The last things a stream is sent, in order, then the close with `code` and `reason`."""

    messages: tuple[dict, ...]
    code: int = 1000
    reason: str = ""


@dataclass(frozen=True)
class Update:
    """A caption update and how much audio had arrived when its state was taken."""

    message: dict
    received_seconds: float

    def aged(self, received_seconds: float) -> "Update":
        """The same captions, later: the audio heard since is still waiting in both stages."""
        extra = received_seconds - self.received_seconds
        message = dict(self.message)
        for key in ("remaining_time_transcription", "remaining_time_diarization"):
            message[key] = round(message[key] + extra, 2)
        return Update(message, received_seconds)


class ClientGone(Exception):
    """The peer closed or vanished: nothing more can be sent."""


class UpdateSlot:
    """The single newest message waiting for the sender; `put` replaces what is there."""

    def __init__(self) -> None:
        self._value: object = None
        self._event = asyncio.Event()

    def put(self, value: object) -> None:
        self._value = value
        self._event.set()

    async def take(self) -> object:
        await self._event.wait()
        self._event.clear()
        value, self._value = self._value, None
        return value


async def asr_endpoint(websocket: WebSocket) -> None:
    """Check, admit, serve, and always release."""
    server: Server = websocket.app.state.server
    config = server.config
    fmt = websocket.query_params.get("format") or config.default_format
    connection_id = str(uuid.uuid4())
    device = None
    if config.refuse_when_full == "http" and _would_be_served(server, websocket, fmt):
        # A proxy can only try another server if it is told before the upgrade.
        device = server.allocator.allocate(connection_id)
        if device is None:
            await _deny_full(server, websocket)
            return
    try:
        await websocket.accept()
    except BaseException:
        if device is not None:
            server.allocator.release(connection_id)
        raise
    if not origin_ok(config.allowed_origins, websocket):
        await _refuse(server, websocket, "origin", 1008, REFUSED_ORIGIN)
        return
    if not token_ok(config.api_token, websocket):
        await _refuse(server, websocket, "unauthorized", 1008, REFUSED_UNAUTHORIZED)
        return
    if fmt not in FORMATS:
        await _refuse_with_error(websocket, f"Unsupported format {fmt!r} (use pcm, webm, ogg or auto)", 1008)
        return
    if server.drain.draining:
        if device is not None:
            server.allocator.release(connection_id)
        await _refuse(server, websocket, "draining", 1001, REFUSED_DRAINING)
        return
    device = device or server.allocator.allocate(connection_id)
    if device is None:
        await _refuse(server, websocket, "full", 1008, REFUSED_FULL)
        return
    server.metrics.admitted(device.id)
    connection = Connection(websocket, server, device, connection_id, fmt)
    server.drain.register(connection)
    try:
        log.info("Connection %s: WebSocket opened on GPU %d", connection_id, device.id)
        await connection.serve()
    finally:
        server.drain.unregister(connection)
        server.allocator.release(connection_id)


def _would_be_served(server: Server, websocket: WebSocket, fmt: str) -> bool:
    """Whether every check before admission passes (their refusals stay closes after the upgrade)."""
    config = server.config
    return (origin_ok(config.allowed_origins, websocket) and token_ok(config.api_token, websocket)
            and fmt in FORMATS and not server.drain.draining)


async def _deny_full(server: Server, websocket: WebSocket) -> None:
    """`--refuse-when-full http`: the upgrade request gets 503, `Retry-After` and the contract's error."""
    server.metrics.rejected("full")
    response = JSONResponse({"error": REFUSED_FULL}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    try:
        await websocket.send_denial_response(response)
    except Exception:
        pass


async def _refuse(server: Server, websocket: WebSocket, reason: str, code: int, message: str) -> None:
    """A refusal before admission: counted by `reason`, and a close with no config message."""
    server.metrics.rejected(reason)
    if reason != "full":  # the allocator logs its own refusals
        errlog.info("Refused connection from %s: %s", _peer(websocket), message)
    try:
        await websocket.close(code, message)
    except Exception:
        pass


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "unknown"


async def _refuse_with_error(websocket: WebSocket, message: str, code: int) -> None:
    try:
        await websocket.send_text(protocol.dumps(protocol.error_message(message, code)))
        await websocket.close(code, message[:123])
    except Exception:
        pass


class Connection:
    def __init__(self, websocket: WebSocket, server: Server, device: Device, connection_id: str, fmt: str) -> None:
        self.ws = websocket
        self.server = server
        self.config = server.config
        self.device = device
        self.id = connection_id
        self.runtime = server.runtimes[device.id]
        self.decoder = make_decoder(fmt)
        self.format = fmt
        self.inbox = AudioInbox()
        self.audio_arrived = asyncio.Event()
        self.ended = False  # the client sent its end of stream
        self.draining = False  # the server asked this stream to finish
        self._aborted = asyncio.Event()
        self.slot = UpdateSlot()
        self.language = websocket.query_params.get("language") or None
        self.meter = StreamMeter(server.metrics, device.id)

    # -- drain (see drain.py) -----------------------------------------------
    def begin_drain(self) -> None:
        """Finish as at the end of stream, but close with 1001 `Server shutting down`."""
        self.draining = True
        self.audio_arrived.set()

    def abort(self) -> None:
        """The drain's grace period is over: end now with an error and 1001."""
        self._aborted.set()

    async def serve(self) -> None:
        await self._send(protocol.config_message(protocol.ConfigInfo(
            gpu_id=self.device.id, connection_id=self.id, device=self.device.label,
            model=self.config.model_label, diarization=self.config.diarization, format=self.format,
        )))
        tasks = [asyncio.create_task(c) for c in (
            self._receive(), self._process(), self._send_updates(), self._wait_for_abort())]
        receiver, processor, sender, _ = tasks
        try:
            waiting = set(tasks)
            while waiting:
                done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    task.result()  # re-raises a failure
                    if task is sender or (task is receiver and not self.ended):
                        return  # the final update went out, or the client went away
        except ClientGone:
            return
        except ConnectionFailure as failure:
            await self._fail(failure)
        except Exception:
            errlog.exception("Connection %s failed", self.id)
            await self._fail(InternalError())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # -- receiver: socket → decoder → inbox -----------------------------
    async def _receive(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                raise NotBinary()
            if len(data) > self.config.max_frame_bytes:
                raise FrameTooLarge(len(data), self.config.max_frame_bytes)
            try:
                audio = self.decoder.feed(data) if data else self.decoder.flush()
            except AudioDecodeError as exc:
                raise DecodeFailed(str(exc)) from exc
            self.inbox.put(audio)
            if audio.size:
                self.meter.audio_in(audio.size / SAMPLE_RATE, self.inbox.received_seconds)
            if not data:
                self.ended = True
            self.audio_arrived.set()
            if self.ended:
                return

    # -- processor: inbox → device worker → caption state ---------------
    async def _process(self) -> None:
        models = await self.runtime.acquire()
        try:
            self.server.memory.account.add_stream(self.device.id, self.id, models.stream_bytes)
            options = SessionOptions(self.config.silence_line_seconds, language=self.language,
                                     trim_seconds=self.config.trim_seconds, policy=self.config.policy)
            session = Session(self.inbox, models, options)
            while not (self.ended or self.draining):
                try:
                    # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                    # that lands as the event fires, and the connection would never end.
                    async with asyncio.timeout(HEARTBEAT_SECONDS):
                        await self.audio_arrived.wait()
                except TimeoutError:
                    continue
                self.audio_arrived.clear()
                state = await self._infer(session.step)
                self.slot.put(Update(protocol.update_message(state), self.inbox.received_seconds))
            final = await self._infer(session.finish)
            if self.ended:
                self.slot.put(Final((protocol.update_message(final), protocol.ready_to_stop_message())))
            else:  # drained: the last update, then 1001 (no ready_to_stop: the client never ended)
                self.slot.put(Final((protocol.update_message(final),), 1001, SHUTTING_DOWN))
        finally:
            self.server.memory.account.remove_stream(self.device.id, self.id)
            self.runtime.release()

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

    async def _wait_for_abort(self) -> None:
        await self._aborted.wait()
        raise ShuttingDown()

    # -- sender: latest-update slot → socket ----------------------------
    async def _send_updates(self) -> None:
        """Send each new state (dropping unchanged ones); while audio flows and the worker is
        busy, repeat the last one at least once a second with its remaining times grown."""
        last: Update | None = None
        last_at = 0.0
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_SECONDS):
                    item = await self.slot.take()
            except TimeoutError:
                heard = self.inbox.received_seconds
                if last is not None and heard > last.received_seconds:
                    last = last.aged(heard)
                    await self._send(last.message)
                    last_at = time.monotonic()
                continue
            if isinstance(item, Final):
                for m in item.messages:
                    await self._send(m)
                await self._close(item.code, item.reason)
                return
            now = time.monotonic()
            if last is None or item.message != last.message or now - last_at >= HEARTBEAT_SECONDS:
                await self._send(item.message)
                last_at = now
            last = item

    # -- socket helpers ---------------------------------------------------
    async def _send(self, message: dict) -> None:
        try:
            await self.ws.send_text(protocol.dumps(message))
        except Exception as exc:  # WebSocketDisconnect, websockets' ConnectionClosed, a closed transport
            raise ClientGone() from exc

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason)
        except Exception:
            pass

    async def _fail(self, failure: ConnectionFailure) -> None:
        """The error message, then the close; logged once."""
        errlog.warning("Connection %s closed with %d: %s", self.id, failure.code, failure.message)
        self.server.metrics.connection_error(self.device.id, failure.code)
        try:
            await self._send(protocol.error_message(failure.message, failure.code))
        except ClientGone:
            return
        await self._close(failure.code, failure.message[:123])
