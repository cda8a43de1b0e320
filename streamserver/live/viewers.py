"""The streams an audience may watch: each live stream by its id, opened with its viewer key.

A viewer link (`/watch/<id>?key=KEY`) reads one stream's captions and nothing else: the key is the
stream's own (`LiveStream.viewer_key`), unguessable, and not its resume token, so a link handed to an
audience can neither take over nor resume the stream. Viewers take no device slot: each is a slot of
the stream's updates (`LiveStream.watch`) drained by its own socket, so one costs the server an
encoding of what changed, a few times a second.
"""
from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .stream import LiveStream


class Viewers:
    def __init__(self, max_per_stream: int) -> None:
        self.max_per_stream = max_per_stream
        self._streams: dict[str, LiveStream] = {}

    def add(self, stream: LiveStream) -> None:
        self._streams[stream.id] = stream

    def remove(self, stream: LiveStream) -> None:
        if self._streams.get(stream.id) is stream:
            del self._streams[stream.id]

    def find(self, stream_id: str, key: str) -> LiveStream | None:
        """The stream this link opens, or None (an unknown id and a wrong key look the same)."""
        stream = self._streams.get(stream_id)
        if stream is None or not hmac.compare_digest(stream.viewer_key.encode(), key.encode()):
            return None
        return stream

    def count(self, device_id: int) -> int:
        """Viewers of the streams on this device."""
        return sum(len(s.viewers) for s in self._streams.values() if s.device.id == device_id)


def viewer_path(stream: LiveStream) -> str:
    """The page a stream's audience opens (relative to the server's address)."""
    return f"/watch/{stream.id}?key={stream.viewer_key}"
