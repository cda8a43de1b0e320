"""Graceful drain: what SIGTERM does, in a fixed order.

1. stop admitting (`/ready` answers 503 draining, new sockets get 1001 `Server is draining`);
2. tell every live stream to finish: it processes what it holds, sends its last
   update and closes with 1001 `Server shutting down`;
3. wait for them, at most `--drain-seconds`; a stream still running then is
   ended with an error message and the same 1001 close;
4. let uvicorn stop, and the process exit 0.

`Drain` is plain asyncio state (tests drive it directly); `GracefulServer` is
uvicorn's server with SIGTERM routed to it instead of uvicorn's immediate stop.
A second SIGTERM, or SIGINT, stops at once the way uvicorn does.
"""
from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import Protocol

import uvicorn

log = logging.getLogger("streamserver.ops.drain")

ABORT_WAIT_SECONDS = 5.0  # after the grace period: time for cut streams to send their close


class Drainable(Protocol):
    def begin_drain(self) -> None:
        """Finish: process what is held, send the last update, close 1001."""

    def abort(self) -> None:
        """Stop now: error message and close 1001, without the last update."""


class Drain:
    """The live streams, and whether the server is draining. Used on the event loop only."""

    def __init__(self) -> None:
        self.draining = False
        self._live: set[Drainable] = set()
        self._empty: asyncio.Event | None = None

    @property
    def live(self) -> int:
        return len(self._live)

    def register(self, stream: Drainable) -> None:
        self._live.add(stream)
        if self.draining:
            stream.begin_drain()

    def unregister(self, stream: Drainable) -> None:
        self._live.discard(stream)
        if not self._live and self._empty is not None:
            self._empty.set()

    async def run(self, grace_seconds: float) -> None:
        """Steps 1–3 above; returns when every stream has ended (or was cut and given time to close)."""
        self.draining = True
        self._empty = asyncio.Event()
        log.info("Draining: %d live streams, grace period %.0f s", len(self._live), grace_seconds)
        for stream in list(self._live):
            stream.begin_drain()
        if not await self._wait_until_empty(grace_seconds):
            log.warning("Drain grace period over: cutting %d streams", len(self._live))
            for stream in list(self._live):
                stream.abort()
            await self._wait_until_empty(ABORT_WAIT_SECONDS)
        log.info("Drained")

    async def _wait_until_empty(self, timeout: float) -> bool:
        if not self._live:
            return True
        assert self._empty is not None
        try:
            async with asyncio.timeout(timeout):
                await self._empty.wait()
        except TimeoutError:
            return False
        return True


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that the first SIGTERM drains before the server stops.

    uvicorn installs `handle_exit` for SIGINT and SIGTERM (with `signal.signal`,
    in `capture_signals`) and re-raises a captured signal after shutdown, which
    would end the process with the signal's status. A drained stop is not
    recorded as captured, so it ends with status 0.
    """

    def __init__(self, config: uvicorn.Config, drain: Drain, grace_seconds: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.grace_seconds = grace_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and not self._drain_requested and not self.should_exit and self._loop:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.get_running_loop().create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.drain.run(self.grace_seconds)
        finally:
            self.should_exit = True
