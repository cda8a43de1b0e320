"""What a diarization backend hands to attribution: who spoke when, in stream time.

Every backend is a model shared per device with per-stream state, like the VAD:

    diarizer.new_state() -> state
    diarizer.process(state, audio, vad_probs) -> list[SpeakerTurn]
    diarizer.flush(state) -> list[SpeakerTurn]
    diarizer.process_batch([DiarizeJob, ...]) -> [list[SpeakerTurn], ...]
    state.covered_until -> float

A session asks with a `DiarizeJob`, and the device's scheduler answers the jobs of
all its streams in one `process_batch` call, as it does the VAD's and Whisper's.

`audio` continues the stream from where the last call ended (16 kHz float32,
a whole number of VAD windows of 512 samples) and `vad_probs` holds Silero's
speech probability for each of those windows, so a backend that needs speech
regions does not run a VAD of its own. Turns returned are final: a backend
never revises a turn it has returned, and `covered_until` (seconds) says up to
where every speech moment has been labelled.
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SpeakerTurn:
    """`speaker` is the backend's own label (0, 1, ...); attribution renumbers them for clients."""

    start: float
    end: float
    speaker: int


@dataclass
class DiarizeJob:
    """A stream's new audio for its diarizer state (with `flush`: the end of the stream)."""

    state: Any
    audio: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    vad_probs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    flush: bool = False


# A stream's diarization step that needs embeddings: it yields the clips to embed and is sent
# their embeddings [n, d]; it returns the turns it gave out.
EmbedSteps = Generator[list[np.ndarray], np.ndarray, list[SpeakerTurn]]


def drive_batched(steps: list[EmbedSteps], embed: Callable[[list[np.ndarray]], np.ndarray]) -> list[list[SpeakerTurn]]:
    """Run several streams' steps together: each wave's clips, from every stream, in one `embed` call."""
    results: list[list[SpeakerTurn]] = [[] for _ in steps]
    asking: dict[int, list[np.ndarray]] = {}

    def advance(i: int, answer: np.ndarray | None) -> None:
        try:
            asking[i] = steps[i].send(answer) if answer is not None else next(steps[i])
        except StopIteration as stop:
            results[i] = stop.value
            asking.pop(i, None)

    for i in range(len(steps)):
        advance(i, None)
    while asking:
        wave = list(asking.items())
        embedded = embed([clip for _, clips in wave for clip in clips])
        at = 0
        for i, clips in wave:
            advance(i, embedded[at:at + len(clips)])
            at += len(clips)
    return results
