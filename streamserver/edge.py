"""The HTTP edge: uvicorn's httptools protocol with time limits on requests that never finish arriving.

uvicorn waits forever for a request head that stops half way, for a connection that
never sends one, and for a body shorter than its `Content-Length`: each holds a socket
and, for a body, the endpoint awaiting it. Here the head must arrive whole within
`--request-timeout` seconds of the connection (or of the previous response), and a body
may not stall (no bytes) for longer than that. Either is answered with 408 if no response
has begun, and the connection is closed. A head larger than 64 KB (httptools sets no bound of
its own) is answered with 431. Idle keep-alive connections and upgraded
WebSockets (a live stream may be quiet for minutes) are not touched by this.
"""
from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("streamserver.edge")

TIMEOUT_BODY = b"Request Timeout: the request did not arrive in time"
MAX_HEAD_BYTES = 64 * 1024  # request line and headers; httptools itself sets no bound
HEAD_BODY = b"Request Header Fields Too Large"


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    request_timeout: float = 30.0  # set from `--request-timeout` (see `protocol_with_timeout`)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._waiting_body = False
        self._head_bytes = 0

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's head must come in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self._waiting_body and self._deadline is not None:
            self._arm()  # a body that keeps coming is not stalled
        elif not self._waiting_body and self.parser is not None:
            self._head_bytes += len(data)  # all of it is head: the head is still incomplete
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, HEAD_BODY)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._arm()  # the next request on a kept-alive connection: its head must come in time

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._waiting_body = True
        self._head_bytes = 0
        self._arm()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._waiting_body = False
        self._disarm()

    def handle_websocket_upgrade(self) -> None:
        self._waiting_body = False
        self._disarm()
        super().handle_websocket_upgrade()

    def _timed_out(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        log.info("Request from %s timed out after %g s (%s)", _peer(self.client), self.request_timeout,
                 "body stalled" if self._waiting_body else "head incomplete")
        # The head never completed, or the body stalled before the endpoint answered: say 408.
        if not self._waiting_body or not self.cycle.response_started:
            self._refuse(408, TIMEOUT_BODY)
        self.transport.close()

    def _refuse(self, status: int, text: bytes) -> None:
        """Answer `status` and close: for a request the endpoint never saw (or never answered)."""
        self._disarm()
        reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, reason, len(text), text))
        self.transport.close()


def protocol_with_timeout(seconds: float) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for uvicorn's `http=` setting, with this server's timeout."""
    return type("StreamserverHttpProtocol", (GuardedHttpToolsProtocol,), {"request_timeout": seconds})


def _peer(client) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"
