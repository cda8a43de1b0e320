"""One stream's share of the metrics: audio received, audio processed, caption lag, turn ends.

The connection knows when audio arrived, the session's updates say which
stream time has been committed and how far processing has got. `ArrivalLog`
remembers at what wall time the stream reached each length; when an update
commits words up to stream time T, the caption lag is now minus the time
stream time T had been received. The log keeps only the arrivals a later commit can still be
measured against (`forget_before`), so an hour of silence does not grow it.
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from ..ops.metrics import Metrics
from .captions import SILENCE_SPEAKER, CaptionState

PAUSE_MARGIN_SECONDS = 2.0


def committed_until(state: CaptionState) -> float:
    """The end (stream seconds) of the last committed word; 0.0 before any."""
    for line in reversed(state.lines):
        if line.speaker != SILENCE_SPEAKER:
            return line.end
    return 0.0


class ArrivalLog:
    """Wall times at which the received stream reached given lengths (event-loop side only)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._marks: deque[tuple[float, float]] = deque()  # (stream seconds received, wall time)
        self._committed = 0.0

    def received(self, stream_seconds: float) -> None:
        """The stream now holds `stream_seconds` of audio."""
        self._marks.append((stream_seconds, self.clock()))

    def forget_before(self, stream_seconds: float) -> None:
        """No word will be committed that ends before `stream_seconds`: keep only the arrival that
        reached it last and the ones after."""
        while len(self._marks) > 1 and self._marks[1][0] <= stream_seconds:
            self._marks.popleft()

    def lag_of(self, state: CaptionState) -> float | None:
        """Seconds between the arrival of the newest committed word's audio and now, if the update commits more."""
        until = committed_until(state)
        if until <= self._committed:
            return None
        self._committed = until
        # The first moment the stream reached `until` (or the latest arrival, when a
        # word's time runs a little past the audio received).
        while len(self._marks) > 1 and self._marks[0][0] < until:
            self._marks.popleft()
        if not self._marks:
            return None
        return max(0.0, self.clock() - self._marks[0][1])

    def since(self, stream_seconds: float) -> float | None:
        """Seconds since the stream first reached `stream_seconds` (None: that arrival is forgotten)."""
        reached = next((wall for at, wall in self._marks if at >= stream_seconds), None)
        return None if reached is None else max(0.0, self.clock() - reached)


class StreamMeter:
    """What one connection reports to the server's `Metrics`, on its device."""

    def __init__(self, metrics: Metrics, gpu_id: int) -> None:
        self.metrics = metrics
        self.gpu_id = gpu_id
        self.arrivals = ArrivalLog()
        self._processed_until = 0.0  # stream seconds already counted as processed
        self._ends = 0  # utterance ends already told

    def audio_in(self, seconds: float, stream_seconds: float) -> None:
        """`seconds` of decoded audio arrived; the stream now holds `stream_seconds`."""
        self.metrics.audio_received(self.gpu_id, seconds)
        self.arrivals.received(stream_seconds)

    def step_done(self, state: CaptionState, received_before: float) -> None:
        """A session step returned `state`; `received_before`: the stream's length when the step began.

        Processed audio is received minus what transcription still has to do; measured
        against the length at the step's start, it never counts audio that came in during it.
        """
        processed = max(self._processed_until, received_before - state.remaining_transcription)
        self.metrics.audio_processed(self.gpu_id, processed - self._processed_until)
        self._processed_until = processed
        lag = self.arrivals.lag_of(state)
        if lag is not None:
            self.metrics.observe_caption_lag(self.gpu_id, lag)
        for end in state.speech_ends[self._ends:]:  # turns told closed: how long after their speech ended
            waited = self.arrivals.since(end)
            if waited is not None:
                self.metrics.observe_turn_end(self.gpu_id, waited)
        self._ends = len(state.speech_ends)
        self.arrivals.forget_before(self._committable_from(state, processed))

    @staticmethod
    def _committable_from(state: CaptionState, processed: float) -> float:
        """The earliest stream time a later commit can reach: the end of the last utterance (its ending
        check may still add words), or, in a pause, a little before what has been processed (the
        VAD moves a speech start back by its padding)."""
        floor = state.speech_ends[-1] if state.speech_ends else 0.0
        return floor if state.in_speech else max(floor, processed - PAUSE_MARGIN_SECONDS)
