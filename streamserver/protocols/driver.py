"""The socket side every event-style protocol shares (OpenAI Realtime, Deepgram): a receiver task that
parses the client's messages into the stream, a sender task that turns each newest state into the
protocol's events, and one way out for every ending (the client's end, the client gone, bad input,
a server failure, the drain). A protocol supplies an `Adapter`; the socket loop is written once.
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Protocol

from starlette.websockets import WebSocket

from ..errors import ConnectionFailure, InternalError, ShuttingDown
from ..live.stream import LiveStream, StreamUpdate

errlog = logging.getLogger("streamserver.connection")


@dataclass(frozen=True)
class Ending:
    """The last events of a socket, then its close."""

    events: list[dict]
    code: int = 1000
    reason: str = ""


class Adapter(Protocol):
    def opening(self) -> list[dict]:
        """Events sent as soon as the stream is admitted."""

    async def on_message(self, message: dict, stream: LiveStream) -> list[dict] | None:
        """A client message (`websocket.receive`): feed the stream; events to answer with, if any.
        Raise a `ConnectionFailure` for input that ends the socket."""

    def render(self, update: StreamUpdate) -> list[dict]:
        """Events for a new state of the stream (what is new since the last one rendered)."""

    def ending(self, update: StreamUpdate) -> Ending:
        """Events for the final state, and the close."""

    def failure(self, failure: ConnectionFailure) -> Ending:
        """How this protocol says a failure."""


class ClientGone(Exception):
    """The peer closed or vanished: nothing more can be sent."""


async def serve(websocket: WebSocket, stream: LiveStream, adapter: Adapter) -> None:
    """The stream over this socket, from the opening events to the close; the caller closes the stream."""
    socket = _Socket(websocket)
    tasks: set[asyncio.Task] = set()
    try:
        await socket.send_all(adapter.opening())
        tasks = {asyncio.create_task(c) for c in (_receive(socket, stream, adapter), _send(socket, stream, adapter),
                                                   stream.wait(), _aborted(stream))}
        while tasks:
            done, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.result() == "over":  # re-raises a failure
                    return
    except ClientGone:
        return
    except ConnectionFailure as failure:
        await _fail(socket, stream, adapter, failure)
    except Exception:
        errlog.exception("Connection %s failed", stream.id)
        await _fail(socket, stream, adapter, InternalError())
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _receive(socket: _Socket, stream: LiveStream, adapter: Adapter) -> str | None:
    while True:
        message = await socket.ws.receive()
        if message["type"] == "websocket.disconnect":
            return None if stream.ended else "over"  # after its end, the client may still wait for the rest
        await socket.send_all(await adapter.on_message(message, stream) or [])


async def _send(socket: _Socket, stream: LiveStream, adapter: Adapter) -> str:
    while True:
        update = await stream.updates.take()
        if update.final:
            ending = adapter.ending(update)
            await socket.send_all(ending.events)
            await socket.close(ending.code, ending.reason)
            return "over"
        await socket.send_all(adapter.render(update))


async def _aborted(stream: LiveStream) -> None:
    await stream.aborted.wait()
    raise ShuttingDown()


async def _fail(socket: _Socket, stream: LiveStream, adapter: Adapter, failure: ConnectionFailure) -> None:
    errlog.warning("Connection %s closed with %d: %s", stream.id, failure.code, failure.message)
    stream.server.metrics.connection_error(stream.device.id, failure.code)
    ending = adapter.failure(failure)
    try:
        await socket.send_all(ending.events)
    except ClientGone:
        return
    await socket.close(ending.code, ending.reason)


class _Socket:
    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send_all(self, events: list[dict]) -> None:
        for event in events:
            try:
                await self.ws.send_text(json.dumps(event, ensure_ascii=False, separators=(",", ":")))
            except Exception as exc:  # WebSocketDisconnect, ConnectionClosed, a closed transport
                raise ClientGone() from exc

    async def close(self, code: int, reason: str) -> None:
        try:
            await self.ws.close(code, reason[:123])
        except Exception:
            pass
