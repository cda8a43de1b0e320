"""Admission of a live stream, the same on every endpoint: the contract's checks in its order (origin,
token, the adapter's own check of its parameters, draining, capacity), then a device slot.

A refusal is returned as data, and each protocol adapter says it in its own way (a close code, an
error event). The refusals a proxy can act on are answered before the upgrade, as HTTP, when the
adapter asks for it: `--refuse-when-full http` makes "full" and "draining" a 503 with `Retry-After`
(a proxy retries another server), and a protocol whose clients expect it (Deepgram) gets 401 for a
bad token.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from collections.abc import Callable

from starlette.responses import JSONResponse, Response
from starlette.websockets import WebSocket

from gpu_manager import Device

from ..ops.auth import origin_ok, token_ok
from ..errors import REFUSED_DRAINING, REFUSED_FULL, REFUSED_ORIGIN, REFUSED_UNAUTHORIZED

if TYPE_CHECKING:
    from ..server import Server

errlog = logging.getLogger("streamserver.connection")

# `--refuse-when-full http`: how long a client or proxy is asked to wait before trying this server again.
RETRY_AFTER_SECONDS = 5
HTTP_STATUS = {"unauthorized": 401, "origin": 403, "format": 400, "full": 503, "draining": 503}


@dataclass(frozen=True)
class Refusal:
    """Why a stream is not admitted: `reason` is the metrics label, `code` and `message` the contract's
    close code and text. `answered`: already said as HTTP before the upgrade (nothing more to send)."""

    reason: str
    code: int
    message: str
    answered: bool = False


Denial = Callable[["Refusal"], Response]


async def admit(server: Server, websocket: WebSocket, stream_id: str, bad_request: str | None = None,
                http_reasons: frozenset[str] = frozenset(), deny: Denial | None = None) -> Device | Refusal:
    """Accept the socket and take a device slot, or say why not. `bad_request`: the adapter's own
    verdict on the request's parameters (an unsupported format), checked after origin and token;
    `http_reasons`: refusals this adapter answers as HTTP instead of accepting the socket, with
    `deny`'s response (default: the status in `HTTP_STATUS` and the contract's error body)."""
    config = server.config
    if config.refuse_when_full == "http":
        http_reasons = http_reasons | {"full", "draining"}
    refusal = _check(server, websocket, bad_request)
    device = None
    if refusal is None and "full" in http_reasons:
        device = server.allocator.allocate(stream_id)  # before the upgrade: a full server says so as HTTP
        if device is None:
            refusal = Refusal("full", 1008, REFUSED_FULL)
    if refusal is not None and refusal.reason in http_reasons:
        await _deny(server, websocket, refusal, deny or http_denial)
        return Refusal(refusal.reason, refusal.code, refusal.message, answered=True)
    try:
        await websocket.accept()
    except BaseException:
        if device is not None:
            server.allocator.release(stream_id)
        raise
    if refusal is not None:
        _count(server, websocket, refusal)
        return refusal
    device = device or server.allocator.allocate(stream_id)
    if device is None:
        refusal = Refusal("full", 1008, REFUSED_FULL)
        _count(server, websocket, refusal)
        return refusal
    server.metrics.admitted(device.id)
    return device


async def admit_resume(server: Server, websocket: WebSocket) -> Refusal | None:
    """A client coming back to its own stream: the same origin and token checks, no new slot (its
    stream still holds one). Accepts the socket unless refused as HTTP."""
    refusal = _check(server, websocket, None)
    await websocket.accept()
    if refusal is not None:
        _count(server, websocket, refusal)
    return refusal


def _check(server: Server, websocket: WebSocket, bad_request: str | None) -> Refusal | None:
    config = server.config
    if not origin_ok(config.allowed_origins, websocket):
        return Refusal("origin", 1008, REFUSED_ORIGIN)
    if not token_ok(config.api_token, websocket):
        return Refusal("unauthorized", 1008, REFUSED_UNAUTHORIZED)
    if bad_request is not None:
        return Refusal("format", 1008, bad_request)
    if server.drain.draining:
        return Refusal("draining", 1001, REFUSED_DRAINING)
    return None


def _count(server: Server, websocket: WebSocket, refusal: Refusal) -> None:
    if refusal.reason == "format":
        return  # a bad request is the client's error, said in the error message, not a refusal
    server.metrics.rejected(refusal.reason)
    if refusal.reason != "full":  # the allocator logs its own refusals
        errlog.info("Refused connection from %s: %s", peer(websocket), refusal.message)


def http_denial(refusal: Refusal) -> Response:
    """The refusal as the answer to the upgrade request: its status, `Retry-After` where trying again
    (elsewhere) makes sense, and the contract's error text."""
    status = HTTP_STATUS.get(refusal.reason, 400)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status in (429, 503) else {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": refusal.message}, status_code=status, headers=headers)


async def _deny(server: Server, websocket: WebSocket, refusal: Refusal, deny: Denial) -> None:
    _count(server, websocket, refusal)
    try:
        await websocket.send_denial_response(deny(refusal))
    except Exception:
        pass


def peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client else "unknown"
