"""Streams whose client dropped, kept for `--resume-seconds` so the client can come back to them.

A stream gets a resume token when it starts (and a new one at every resume: each token works once).
The token is a secret: only its SHA-256 is kept, and the match is confirmed with a constant-time
comparison. A parked stream keeps its device slot (it still counts in `/gpu-status`, as `held`), its
session (every committed line, speakers, the decoder's and the diarizer's state) and the count of
audio bytes received, so the client resends only what was lost. When the time runs out, or the
server drains, the stream is closed and its slot freed.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field

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
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
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
        if parked.stream.closed:
            return None
        parked.stream.parked = False
        return parked

    def held(self, device_id: int) -> int:
        """Slots of this device held for clients that may come back."""
        return sum(1 for p in self._parked.values() if p.stream.device.id == device_id)

    def forget(self, stream: LiveStream) -> None:
        self._digests.pop(stream.id, None)

    def _expire(self, digest: bytes) -> None:
        parked = self._parked.pop(digest, None)
        if parked is not None:
            self._digests.pop(parked.stream.id, None)
            log.info("Connection %s: not resumed in %.0f s, released", parked.stream.id, self.seconds)
            asyncio.ensure_future(parked.stream.close())

    async def close_all(self) -> None:
        for digest in list(self._parked):
            parked = self._parked.pop(digest)
            if parked.expiry is not None:
                parked.expiry.cancel()
            await parked.stream.close()
