"""`/asr`: WhisperLiveKit's protocol, as the contract gives it (binary audio in, caption state out:
whole by default, or only what changed with `?updates=incremental`, `asr_updates.py`).

The adapter owns the socket and two tasks: the receiver (socket → decoder → the
stream; the only text frame it takes is `{"type": "snapshot"}`) and the sender
(`asr_updates.send_updates`). The stream's work and its slot belong to the
`LiveStream`. A client whose socket drops without its end of stream may come back
with its resume token (`resume.py`): the stream is parked, not closed, for
`--resume-seconds`. Its viewers (`asr_watch.py`) watch the stream, not the socket.
"""
from __future__ import annotations

import asyncio
import json
import logging
import uuid

from starlette.websockets import WebSocket

from ..audio.decoders import FORMATS, AudioDecodeError, Decoder, make_decoder
from ..errors import (
    SHUTTING_DOWN,
    UNKNOWN_SESSION,
    ConnectionFailure,
    DecodeFailed,
    FrameTooLarge,
    InternalError,
    NotBinary,
    ShuttingDown,
)
from ..live.admission import Refusal, admit, admit_resume
from ..live.stream import LiveStream, StreamUpdate
from ..live.viewers import viewer_path
from ..server import Server
from ..live.session import SessionOptions
from . import asr_wire as wire
from .asr_updates import UPDATE_MODES, UpdateEncoder, send_updates

log = logging.getLogger("gpu_manager")
errlog = logging.getLogger("streamserver.connection")


class ClientGone(Exception):
    """The peer closed or vanished: nothing more can be sent."""


def session_options(server: Server, websocket: WebSocket) -> SessionOptions:
    config = server.config
    return SessionOptions(config.silence_line_seconds, language=websocket.query_params.get("language") or None,
                          trim_seconds=config.trim_seconds, policy=config.policy)


async def asr_endpoint(websocket: WebSocket) -> None:
    """Check, admit, serve, and always release."""
    server: Server = websocket.app.state.server
    fmt = websocket.query_params.get("format") or server.config.default_format
    if websocket.query_params.get("resume") is not None:
        await resume_asr(server, websocket, websocket.query_params["resume"])
        return
    stream_id = str(uuid.uuid4())
    admitted = await admit(server, websocket, stream_id, _bad_request(fmt, _updates_mode(websocket)))
    if isinstance(admitted, Refusal):
        await refuse(websocket, admitted)
        return
    stream = LiveStream(server, admitted, stream_id, session_options(server, websocket))
    stream.start()
    log.info("Connection %s: WebSocket opened on GPU %d", stream_id, admitted.id)
    await _serve(server, AsrClient(websocket, stream, make_decoder(fmt), fmt))


def _updates_mode(websocket: WebSocket) -> str:
    return websocket.query_params.get("updates") or "full"


def _bad_request(fmt: str, updates: str) -> str | None:
    if fmt not in FORMATS:
        return f"Unsupported format {fmt!r} (use pcm, webm, ogg or auto)"
    if updates not in UPDATE_MODES:
        return f"Unsupported updates mode {updates!r} (use full or incremental)"
    return None


async def resume_asr(server: Server, websocket: WebSocket, token: str) -> None:
    """A client back with its resume token: its own stream again, from where the server had got."""
    refusal = await admit_resume(server, websocket)
    if refusal is None and _updates_mode(websocket) not in UPDATE_MODES:
        refusal = Refusal("format", 1008, _bad_request("auto", _updates_mode(websocket)))
    if refusal is not None:
        await refuse(websocket, refusal)
        return
    parked = server.resumes.take(token)
    if parked is None:
        await refuse(websocket, Refusal("unknown-session", 1008, UNKNOWN_SESSION))
        return
    stream = parked.stream
    log.info("Connection %s: resumed on GPU %d after %d bytes", stream.id, stream.device.id, stream.received_bytes)
    client = AsrClient(websocket, stream, parked.decoder, parked.format)
    await _serve(server, client, {"resumed": True, "received_bytes": stream.received_bytes})


async def _serve(server: Server, client: AsrClient, resumed: dict | None = None) -> None:
    """Serve the stream on this socket; afterwards park it for a resume, or close it."""
    parked = False
    try:
        parked = await client.serve(server.resumes.token_for(client.stream), resumed)
    finally:
        if parked:
            server.resumes.park(client.stream, client.decoder, client.format)
        else:
            server.resumes.forget(client.stream)
            await client.stream.close()


async def refuse(websocket: WebSocket, refusal: Refusal) -> None:
    """The contract's refusals: a close with no config message (a bad format also gets the error message)."""
    if refusal.answered:
        return
    try:
        if refusal.reason == "format":
            await websocket.send_text(wire.dumps(wire.error_message(refusal.message, refusal.code)))
        await websocket.close(refusal.code, refusal.message[:123])
    except Exception:
        pass


class AsrClient:
    """One socket's side of an `/asr` stream."""

    def __init__(self, websocket: WebSocket, stream: LiveStream, decoder: Decoder, fmt: str) -> None:
        self.ws = websocket
        self.stream = stream
        self.decoder = decoder
        self.format = fmt
        self.config = stream.server.config
        self.encoder = UpdateEncoder(_updates_mode(websocket) == "incremental")

    def config_message(self, extra: dict) -> dict:
        return wire.stream_config(self.stream, self.format, self.encoder.mode,
                                  {"viewer_url": viewer_path(self.stream), **extra})

    async def serve(self, resume_token: str | None, resumed: dict | None = None) -> bool:
        """The stream over this socket until its end; True if the client vanished mid-stream and the
        stream should wait for it to come back (it has a resume token), False when it is over."""
        extra = {"resume_token": resume_token} if resume_token else {}
        await self._send(self.config_message({**extra, **(resumed or {})}))
        if self.stream.latest is not None:  # a resumed client gets the current state first
            self.stream.updates.put(self.stream.latest)
        stream = self.stream
        tasks = {asyncio.create_task(c) for c in (self._receive(), self._send_updates(), stream.wait(),
                                                   self._wait_for_abort())}
        try:
            while tasks:
                done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    outcome = task.result()  # re-raises a failure
                    if outcome == "sent-final":
                        return False
                    if outcome == "gone":
                        return resume_token is not None and not stream.finished
                    if outcome == "left":
                        return False
        except ClientGone:
            return resume_token is not None and not stream.finished and not stream.ended
        except ConnectionFailure as failure:
            await self._fail(failure)
        except Exception:
            errlog.exception("Connection %s failed", stream.id)
            await self._fail(InternalError())
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return False

    # -- receiver: socket → decoder → stream ------------------------------
    async def _receive(self) -> str:
        stream = self.stream
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                # No close code (uvicorn says 1005 or 1006): the network dropped and the client may come
                # back. A close it sent (1000, 1001: a tab closed) ends the stream as its end of stream would.
                if stream.ended:
                    return "ended"
                return "gone" if message.get("code", 1006) in (1005, 1006) else "left"
            data = message.get("bytes")
            if data is None:
                self._snapshot_request(message.get("text"))
                continue
            if len(data) > self.config.max_frame_bytes:
                raise FrameTooLarge(len(data), self.config.max_frame_bytes)
            try:
                audio = self.decoder.feed(data) if data else self.decoder.flush()
            except AudioDecodeError as exc:
                raise DecodeFailed(str(exc)) from exc
            stream.feed(audio, len(data))
            if not data:
                stream.end()
                return "ended"

    def _snapshot_request(self, text: str | None) -> None:
        """`{"type": "snapshot"}`: the next update carries every line. Any other text frame is an error."""
        try:
            request = json.loads(text or "")
        except ValueError:
            request = None
        if not (isinstance(request, dict) and request.get("type") == "snapshot"):
            raise NotBinary()
        self.encoder.snapshot()
        if self.stream.latest is not None and not self.stream.latest.final:
            self.stream.updates.put(self.stream.latest)  # wake the sender: sent even if nothing changed

    async def _wait_for_abort(self) -> None:
        await self.stream.aborted.wait()
        raise ShuttingDown()

    # -- sender: the stream's newest state → socket ------------------------
    async def _send_updates(self) -> str:
        stream = self.stream
        final = await send_updates(stream.updates, self.encoder, self._send, lambda: stream.inbox.received_seconds,
                                   self.config.max_updates_per_second)
        if final is None:  # the stream was closed under the socket (it never does while served)
            return "left"
        return await self._send_final(final)

    async def _send_final(self, item: StreamUpdate) -> str:
        await self._send(self.encoder.encode(item.state, force=True))
        if item.drained:  # the last update, then 1001 (no ready_to_stop: the client never ended)
            await self._close(1001, SHUTTING_DOWN)
        else:
            await self._send(wire.ready_to_stop_message())
            await self._close(1000, "")
        return "sent-final"

    # -- socket helpers ---------------------------------------------------
    async def _send(self, message: dict) -> None:
        try:
            await self.ws.send_text(wire.dumps(message))
        except Exception as exc:  # WebSocketDisconnect, websockets' ConnectionClosed, a closed transport
            raise ClientGone() from exc

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason)
        except Exception:
            pass

    async def _fail(self, failure: ConnectionFailure) -> None:
        """The error message, then the close; logged once."""
        stream = self.stream
        errlog.warning("Connection %s closed with %d: %s", stream.id, failure.code, failure.message)
        stream.server.metrics.connection_error(stream.device.id, failure.code)
        try:
            await self._send(wire.error_message(failure.message, failure.code))
        except ClientGone:
            return
        await self._close(failure.code, failure.message[:123])
