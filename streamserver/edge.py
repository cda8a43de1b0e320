"""The HTTP edge: uvicorn's protocols with limits on what a client may send and how slowly.

`serve()` hands uvicorn these classes (`http=`, `ws=`) instead of its defaults, so every
connection, plain HTTP or WebSocket upgrade, passes here before the app sees it:

- **Sizes.** A URL over `MAX_URL_BYTES` is answered 414; a header line over
  `MAX_HEADER_LINE_BYTES`, more than `MAX_HEADERS` header fields, or a head over
  `MAX_HEAD_BYTES` in all, 431. httptools itself has no limit (it buffers whatever
  comes), and the WebSocket handshake parser's own limits (8 KiB lines, 128 headers)
  are above these, so an oversized upgrade is refused here too, with the same codes.
- **Time** (`--request-timeout`). A connection must send a whole request head
  within that time of connecting (or of its previous response), and a request body may
  not pause longer than that: otherwise 408 (while no response has begun) and the
  connection closes. A connection that sends nothing is closed. After an answer given
  before the body was all read (a 413), what is left of the body is read and thrown
  away for at most that long. An upgraded WebSocket is never timed here: a live stream
  may be quiet for minutes, and has its own rules.
- **Answers that arrive.** Every refusal is written, then the sending side is shut
  (FIN) while whatever the client still sends is read and discarded for a moment
  (`LINGER_SECONDS`): closing with unread data would make the kernel send a reset,
  which can destroy the answer before the client reads it.

`EdgeWebSocketProtocol` fixes the hang of uvicorn 0.50-0.51 (whose default became
websockets' sans-I/O protocol) with websockets >= 17: a handshake that websockets
rejects (it queues a 414/431/400 and logs "HTTP response sent") was neither written nor
closed, so the client waited until it gave up. Newer uvicorn writes it; this does it
on any version.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # uvicorn < 0.35: its default (legacy websockets) answers rejected handshakes itself
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("streamserver.edge")

MAX_URL_BYTES = 8000  # 414 above: the request line stays under the 8 KiB every proxy and parser accepts
MAX_HEADER_LINE_BYTES = 8000  # 431 above, for one header (name and value)
MAX_HEADERS = 100  # 431 above
MAX_HEAD_BYTES = 64 * 1024  # 431 above: the whole head, URL and headers
LINGER_SECONDS = 2.0  # after a refusal: how long the client's further bytes are read and dropped

REASONS = {408: "Request Timeout", 414: "URI Too Long", 431: "Request Header Fields Too Large"}


class EdgeHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the size and time limits above. `request_timeout` is set per
    server by `protocol_with_timeout()` (uvicorn builds the protocol itself and passes it no arguments of ours)."""

    request_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._in_head = True  # no request head has completed since the last message ended
        self._begun = False  # the current message has sent its first byte
        self._head_bytes = 0  # bytes read while `_in_head`
        self._url_bytes = 0
        self._header_bytes = 0
        self._header_count = 0
        self._refusal: tuple[int, str] | None = None
        self._closing = False  # refused or upgraded: nothing more for this protocol to parse or time

    # --- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # the first request's head must come in time

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # after a refusal: dropped, while the answer reaches the client
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._refusal is None and self._in_head and self._head_bytes > MAX_HEAD_BYTES and self._begun:
            # httptools keeps a header that has not ended inside itself (a long URL is counted as it comes)
            self._refusal = (431, "Request header fields too large")
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._timer is None and self._in_head and self.timeout_keep_alive_task is None \
                and (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self._arm()  # bytes between requests (they cancelled the keep-alive timer): the next head is due

    # --- httptools callbacks: count the head, and skip the request once it is refused

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._url_bytes = self._header_bytes = self._header_count = 0
        if self._timer is None:
            self._arm()  # the next request on a kept-alive connection: its head must come in time

    def on_url(self, url: bytes) -> None:
        if self._refusal is not None:
            return
        self._url_bytes += len(url)
        if self._url_bytes > MAX_URL_BYTES:
            self._refusal = (414, "Request URL too long")
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._refusal is not None:
            return
        self._header_count += 1
        size = len(name) + len(value)
        self._header_bytes += size + 4
        if size > MAX_HEADER_LINE_BYTES or self._header_count > MAX_HEADERS \
                or self._url_bytes + self._header_bytes > MAX_HEAD_BYTES:
            self._refusal = (431, "Request header fields too large")
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._in_head = False
        self._disarm()
        super().on_headers_complete()
        if not self._closing:
            self._arm()  # the body (if any) must keep coming; disarmed when the message completes

    def on_body(self, body: bytes) -> None:
        if self._refusal is not None or self.cycle is None:
            return
        if self._timer is not None and not self.cycle.response_complete:
            self._arm()  # a body that keeps coming is not stalled (one already answered is only thrown away)
        super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is not None or self.cycle is None:
            return
        super().on_message_complete()
        self._in_head, self._begun, self._head_bytes = True, False, 0
        self._disarm()  # until the response is out, the endpoint takes what time it needs

    def handle_websocket_upgrade(self) -> None:
        if self._refusal is not None:
            return
        self._closing = True  # the WebSocket protocol owns the socket now, with its own rules
        self._disarm()
        super().handle_websocket_upgrade()

    def _unsupported_upgrade_warning(self) -> None:
        if self._refusal is None:  # a refused upgrade kept none of its headers: it is not "unsupported"
            super()._unsupported_upgrade_warning()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._in_head and self.cycle is not None and self.cycle.more_body and not self._closing:
            # answered before the body was read (413): the rest is thrown away for at most the timeout
            self._arm()

    # --- time

    def _arm(self) -> None:
        self._disarm()
        self._timer = self.loop.call_later(self.request_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self._closing or self.transport.is_closing():
            return
        cycle = self.cycle
        if self._in_head:
            if cycle is not None and not cycle.response_complete:
                self._arm()  # a pipelined head waits behind an answer still being written
            elif not self._begun:
                log.debug("Closing a connection from %s that sent no request in %g s", _peer(self.client),
                          self.request_timeout)
                self._closing = True
                self.transport.close()
            else:
                log.info("Request head from %s incomplete after %g s: 408", _peer(self.client), self.request_timeout)
                self._refuse(408, "Request head not received in time")
            return
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            self._arm()  # the server is the one not reading (a busy endpoint, or 100-continue not yet sent)
        elif not cycle.response_started:
            log.info("Request body from %s stalled for %g s: 408", _peer(self.client), self.request_timeout)
            cycle.disconnected = True  # the endpoint reading it sees the client gone, and answers no one
            cycle.message_event.set()
            self._refuse(408, "Request body stalled")
        elif cycle.response_complete:
            self._closing = True
            self.transport.close()  # the rest of a refused body: enough has been thrown away
        else:
            self._arm()  # the endpoint is answering while the body is unfinished: its business

    # --- refusing

    def _refuse(self, status: int, message: str) -> None:
        """Answer `status` with `{"error": message}`, then close the connection without a reset."""
        self._refusal = (status, message)
        self._closing = True
        self._disarm()
        if self.transport.is_closing():
            return
        if status != 408:
            log.info("Refused a request from %s: %d %s", _peer(self.client), status, message)
        if self.cycle is not None and not self.cycle.response_complete and not self.cycle.disconnected:
            self.transport.close()  # an answer to an earlier (pipelined) request is still being written
            return
        body = json.dumps({"error": message}).encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status].encode())]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json\r\n", b"content-length: %d\r\n" % len(body),
                 b"connection: close\r\n\r\n"]
        self.transport.write(b"".join(head) + body)
        linger_close(self.transport, self.loop)


def linger_close(transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
    """Shut the sending side once the answer is out, and close for good when the client closes its side
    or after `LINGER_SECONDS`. (TLS cannot half-close: closed at once.)"""
    if not transport.can_write_eof():
        transport.close()
        return
    transport.write_eof()
    if hasattr(transport, "is_reading") and not transport.is_reading():
        transport.resume_reading()  # read what the client still sends, so the kernel sends no reset
    loop.call_later(LINGER_SECONDS, transport.close)


def protocol_with_timeout(seconds: float) -> type[EdgeHttpProtocol]:
    """The class for uvicorn's `http=` setting, with this server's `--request-timeout`."""
    return type("StreamserverHttpProtocol", (EdgeHttpProtocol,), {"request_timeout": seconds})


if WebSocketsSansIOProtocol is not None:
    class EdgeWebSocketProtocol(WebSocketsSansIOProtocol):  # type: ignore[misc,valid-type]
        """websockets' sans-I/O protocol under uvicorn, answering every handshake websockets rejects."""

        def handle_events(self) -> None:
            if self.conn.handshake_exc is not None and not self.handshake_initiated and not self.close_sent:
                self.handshake_complete = True
                self.close_sent = True
                answer = b"".join(self.conn.data_to_send())
                if not answer.startswith(b"HTTP/"):  # websockets < 17 queues no answer, only the end
                    answer = self.conn.reject(400, "Failed to open a WebSocket connection: invalid request.\n"
                                              ).serialize()
                self.transport.write(answer)
                linger_close(self.transport, self.loop)
                return
            super().handle_events()
else:  # pragma: no cover
    EdgeWebSocketProtocol = None  # type: ignore[assignment,misc]


def websocket_protocol() -> Any:
    """The class (or name) for uvicorn's `ws=` setting."""
    return EdgeWebSocketProtocol if EdgeWebSocketProtocol is not None else "auto"


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown"
