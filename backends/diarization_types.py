"""What a diarization backend hands to attribution: who spoke when, in stream time.

Every backend is a model shared per device with per-stream state, like the VAD:

    diarizer.new_state() -> state
    diarizer.process(state, audio, vad_probs) -> list[SpeakerTurn]
    diarizer.flush(state) -> list[SpeakerTurn]
    state.covered_until -> float

`audio` continues the stream from where the last call ended (16 kHz float32,
a whole number of VAD windows of 512 samples) and `vad_probs` holds Silero's
speech probability for each of those windows, so a backend that needs speech
regions does not run a VAD of its own. Turns returned are final: a backend
never revises a turn it has returned, and `covered_until` (seconds) says up to
where every speech moment has been labelled.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SpeakerTurn:
    """`speaker` is the backend's own label (0, 1, ...); attribution renumbers them for clients."""

    start: float
    end: float
    speaker: int
