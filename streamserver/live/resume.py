"""Streams whose client dropped, kept for `--resume-seconds` so the client can come back to them.

A stream gets a resume token when it starts (and a new one at every resume: each token works once).
The token is a secret: only its SHA-256 is kept, and the match is confirmed with a constant-time
comparison. A parked stream holds its device slot (`Allocator.hold`: `/gpu-status` counts it as
`held_for_resume`, not as an active connection), its session (every committed line, speakers, the
decoder's and the diarizer's state) and the count of audio bytes received, so the client resends only
what was lost. When the time runs out, when the server drains, or when a new connection needs the
slot (the oldest parked stream gives its slot up first: a client that drops connections in a loop
never keeps others out), the stream is closed and its token stops working.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field

from gpu_manager import Allocator

from ..audio.decoders import Decoder
from .stream import LiveStream

log = logging.getLogger("streamserver.resume")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass
class Parked:
    """A stream waiting for its client: what the adapter needs to take it up again."""

    stream: LiveStream
    decoder: Decoder
    format: str
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)


class Resumes:
    def __init__(self, seconds: float, allocator: Allocator) -> None:
        self.seconds = seconds
        self.allocator = allocator
        allocator.on_preempt = self._preempted
        self._digests: dict[str, bytes] = {}  # stream id -> digest of its current token
        self._parked: dict[bytes, Parked] = {}

    def token_for(self, stream: LiveStream) -> str | None:
        """A fresh token for the stream (the one before stops working); None with `--resume-seconds 0`."""
        if self.seconds <= 0:
            return None
        token = secrets.token_urlsafe(24)
        self._digests[stream.id] = _digest(token)
        return token

    def park(self, stream: LiveStream, decoder: Decoder, fmt: str) -> None:
        """The client vanished mid-stream: keep the stream for `seconds`, then close it."""
        digest = self._digests.get(stream.id)
        if digest is None or stream.finished:
            asyncio.ensure_future(stream.close())
            return
        parked = Parked(stream, decoder, fmt)
        parked.expiry = asyncio.get_running_loop().call_later(self.seconds, self._expire, digest)
        self._parked[digest] = parked
        stream.parked = True
        self.allocator.hold(stream.id)
        log.info("Connection %s: client gone, stream kept %.0f s for it to resume", stream.id, self.seconds)

    def take(self, token: str) -> Parked | None:
        """The parked stream this token opens, taken out of the registry (a token works once)."""
        digest = _digest(token)
        parked = self._parked.get(digest)
        if parked is None or not hmac.compare_digest(digest, self._digests.get(parked.stream.id, b"")):
            return None
        del self._parked[digest]
        self._digests.pop(parked.stream.id, None)
        if parked.expiry is not None:
            parked.expiry.cancel()
        if parked.stream.closed or not self.allocator.unhold(parked.stream.id):
            return None
        parked.stream.parked = False
        return parked

    def forget(self, stream: LiveStream) -> None:
        self._digests.pop(stream.id, None)

    def _expire(self, digest: bytes) -> None:
        self._release(digest, "not resumed in %.0f s, released" % self.seconds)

    def _preempted(self, stream_id: str) -> None:
        """A new connection took this parked stream's slot (the allocator already freed it)."""
        digest = self._digests.get(stream_id)
        if digest is not None:
            self._release(digest, "slot given to a new connection, released")

    def _release(self, digest: bytes, why: str) -> None:
        parked = self._parked.pop(digest, None)
        if parked is not None:
            self._digests.pop(parked.stream.id, None)
            if parked.expiry is not None:
                parked.expiry.cancel()
            log.info("Connection %s: %s", parked.stream.id, why)
            asyncio.ensure_future(parked.stream.close())

    async def close_all(self) -> None:
        for digest in list(self._parked):
            parked = self._parked.pop(digest)
            if parked.expiry is not None:
                parked.expiry.cancel()
            await parked.stream.close()
