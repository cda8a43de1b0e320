"""`WS /asr/watch/<id>?key=KEY`: a read-only audience for an `/asr` stream.

A viewer gets a `config` message, the stream's current captions whole, then its updates as they
come (incremental, `asr_updates.py`; `{"type": "snapshot"}` asks for a whole one again). It takes no
device slot and sends no audio; it follows the stream, not the speaker's socket, so it stays through
the speaker's resume. When the stream ends, the viewer gets the last update and a close with 1000
(1001 when the server drained it). A wrong key or an unknown id closes with 1008 `Unknown stream`
before any message; past `--max-viewers-per-stream`, 1013 `Too many viewers`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from starlette.websockets import WebSocket

from ..errors import REFUSED_ORIGIN, SHUTTING_DOWN
from ..live.stream import LiveStream, UpdateSlot
from ..ops.auth import origin_ok
from ..server import Server
from . import asr_wire as wire
from .asr_updates import UpdateEncoder, send_updates

log = logging.getLogger("streamserver.viewers")

UNKNOWN_STREAM = "Unknown stream"
TOO_MANY_VIEWERS = "Too many viewers"


async def watch_endpoint(websocket: WebSocket) -> None:
    server: Server = websocket.app.state.server
    await websocket.accept()
    if not origin_ok(server.config.allowed_origins, websocket):
        await websocket.close(1008, REFUSED_ORIGIN)
        return
    stream = server.viewers.find(websocket.path_params["stream_id"], websocket.query_params.get("key", ""))
    if stream is None:
        await websocket.close(1008, UNKNOWN_STREAM)
        return
    slot = stream.watch(server.viewers.max_per_stream)
    if slot is None:
        await websocket.close(1013, TOO_MANY_VIEWERS)
        return
    try:
        await _serve(websocket, stream, slot, server.config.max_updates_per_second)
    finally:
        stream.unwatch(slot)


async def _serve(websocket: WebSocket, stream: LiveStream, slot: UpdateSlot, rate: float) -> None:
    encoder = UpdateEncoder(incremental=True)
    with contextlib.suppress(Exception):  # a viewer that left: nothing to tell anyone
        await websocket.send_text(wire.dumps(wire.stream_config(stream, "none", encoder.mode, {"viewer": True})))

        async def send(message: dict) -> None:
            await websocket.send_text(wire.dumps(message))

        sender = asyncio.create_task(send_updates(slot, encoder, send, lambda: stream.inbox.received_seconds, rate))
        receiver = asyncio.create_task(_receive(websocket, stream, slot, encoder))
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
        if sender in done and not sender.cancelled() and sender.exception() is None:
            final = sender.result()
            if final is not None:
                await send(encoder.encode(final.state, force=True))
            await websocket.close(1001 if final is not None and final.drained else 1000,
                                  SHUTTING_DOWN if final is not None and final.drained else "")


async def _receive(websocket: WebSocket, stream: LiveStream, slot: UpdateSlot, encoder: UpdateEncoder) -> None:
    """Until the viewer leaves; `{"type": "snapshot"}` asks for every line again, anything else is ignored."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        try:
            request = json.loads(message.get("text") or "")
        except ValueError:
            continue
        if isinstance(request, dict) and request.get("type") == "snapshot":
            encoder.snapshot()
            if stream.latest is not None and not stream.latest.final:
                slot.put(stream.latest)
