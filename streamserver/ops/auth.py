"""Access control: the API token and the browser origins allowed to open `/asr`.

The token comes as `Authorization: Bearer T` (OpenAI's clients), `Authorization: Token T`
(Deepgram's) or `?token=T` (browsers cannot set headers on a WebSocket) and is compared in constant time. An `Origin` header is
what a browser sends; a client without one is not a browser and the origin
rule does not apply to it (the token still does).
"""
from __future__ import annotations

import functools
import hmac
from collections.abc import Awaitable, Callable

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from ..errors import REFUSED_UNAUTHORIZED


def presented_token(conn: HTTPConnection) -> str | None:
    """The token the client sent, from the header or the query."""
    header = conn.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() in ("bearer", "token") and value.strip():
        return value.strip()
    return conn.query_params.get("token")


def token_ok(expected: str | None, conn: HTTPConnection) -> bool:
    """True when no token is configured, or the client's matches it."""
    if not expected:
        return True
    given = presented_token(conn)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _normal_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_ok(allowed: tuple[str, ...] | None, conn: HTTPConnection) -> bool:
    """True with no `--allowed-origins`, with no `Origin` header, or with an origin in the list (`*`: any)."""
    origin = conn.headers.get("origin")
    if not allowed or origin is None:
        return True
    wanted = {_normal_origin(a) for a in allowed}
    return "*" in wanted or _normal_origin(origin) in wanted


Endpoint = Callable[[Request], Awaitable[Response]]


def require_token(endpoint: Endpoint) -> Endpoint:
    """Wrap an HTTP endpoint: 401 `{"error": "Unauthorized"}` unless the server's token is presented."""

    @functools.wraps(endpoint)
    async def guarded(request: Request) -> Response:
        if not token_ok(request.app.state.server.config.api_token, request):
            return JSONResponse({"error": REFUSED_UNAUTHORIZED}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        return await endpoint(request)

    return guarded
