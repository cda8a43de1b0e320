"""What one `/asr` socket (the speaker's, or a viewer's) is sent of its stream's states.

`full` (WhisperLiveKit's protocol, the default) sends the whole caption state each time; over an
hour that is megabytes a minute, growing with the transcript. `incremental` (`?updates=incremental`,
and every viewer) sends only the lines from the first one that changed (`from_line`: every line
before it is as the client already has it) with a sequence number; a client that lost track asks
for a whole update with `{"type": "snapshot"}`. Lines only ever change at the end (a committed line
never changes again, and the transcript only appends or extends its last line), so what changed is
found from the count of lines sent and the last of them, in constant time and memory.

`send_updates` is the sender both kinds of socket run: the newest state when it changes, at most
`rate` updates a second (the slot keeps only the newest state meanwhile), and while audio flows and
nothing changed, the last update again each second with its remaining times grown.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace

from ..live.captions import CaptionState, Line
from ..live.stream import HEARTBEAT_SECONDS, StreamUpdate, UpdateSlot
from . import asr_wire as wire

UPDATE_MODES = ("full", "incremental")


class UpdateEncoder:
    """One socket's view of the stream: what it was last sent, and the next update to send."""

    def __init__(self, incremental: bool) -> None:
        self.incremental = incremental
        self.seq = 0
        self._count = 0  # lines the client holds
        self._last_line: Line | None = None  # the last of them, as sent (the only one that may still change)
        self._fields: dict | None = None  # everything but the lines, as last sent
        self._whole = True  # the next update carries every line

    @property
    def mode(self) -> str:
        return "incremental" if self.incremental else "full"

    def snapshot(self) -> None:
        """The client asked for everything again (it lost track, or came back after a resume)."""
        self._whole = True

    def encode(self, state: CaptionState, force: bool = False) -> dict | None:
        """The update for `state`, or None when the client already has all of it (unless `force`)."""
        lines = state.lines
        fields = wire.update_fields(state)
        if self._whole or len(lines) < self._count:
            first = 0
        elif self._count and lines[self._count - 1] != self._last_line:
            first = self._count - 1
        else:
            first = self._count
        changed = self._whole or first < len(lines) or fields != self._fields
        if not (changed or force):
            return None
        self._whole = False
        self._count, self._last_line, self._fields = len(lines), (lines[-1] if lines else None), fields
        if not self.incremental:
            return wire.update_message(state)
        self.seq += 1
        return wire.incremental_message(self.seq, first, [wire.line_message(line) for line in lines[first:]], fields)


Send = Callable[[dict], Awaitable[None]]


async def send_updates(slot: UpdateSlot, encoder: UpdateEncoder, send: Send, received_seconds: Callable[[], float],
                       rate: float) -> StreamUpdate | None:
    """Send the stream's states from `slot` until its final one, which is returned unsent (the caller
    says the end its own way); None if the stream went away without one."""
    gap = 1.0 / rate if rate > 0 else 0.0
    last: StreamUpdate | None = None
    sent_at = -float("inf")
    while True:
        try:
            async with asyncio.timeout(HEARTBEAT_SECONDS):
                item = await slot.take()
        except TimeoutError:
            heard = received_seconds()
            if last is not None and heard > last.received_seconds:
                # The same captions, later: the audio heard since is still waiting in both stages.
                extra = heard - last.received_seconds
                state = replace(last.state, remaining_transcription=last.state.remaining_transcription + extra,
                                remaining_diarization=last.state.remaining_diarization + extra)
                last = StreamUpdate(state, heard)
                await send(encoder.encode(state, force=True))
                sent_at = time.monotonic()
            continue
        if item is None or item.final:
            return item
        now = time.monotonic()
        message = encoder.encode(item.state, force=now - sent_at >= HEARTBEAT_SECONDS)
        last = item
        if message is not None:
            await send(message)
            sent_at = now
            # Coalesce: while this waits, the slot keeps only the newest state.
            await asyncio.sleep(max(0.0, sent_at + gap - time.monotonic()))
