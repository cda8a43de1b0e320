"""What an ASR backend hands to a streaming policy: words with times, grouped in segments.

Plain values, so policies are tested with hand-made hypotheses.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Generator
from typing import TypeVar
from dataclasses import dataclass

import numpy as np

T = TypeVar("T")
_NORM = re.compile(r"[^\w']+")


@dataclass(frozen=True)
class Word:
    """A word and its times in seconds. `text` keeps Whisper's leading space (" Hello")."""

    start: float
    end: float
    text: str

    @property
    def key(self) -> str:
        """The word with case and punctuation removed, for comparing two hypotheses."""
        return _NORM.sub("", self.text.lower())

    def shifted(self, offset: float) -> "Word":
        return Word(self.start + offset, self.end + offset, self.text)


@dataclass(frozen=True)
class Segment:
    """A run of words Whisper closed with a timestamp token: a natural place to cut the audio."""

    start: float
    end: float
    words: tuple[Word, ...]

    def shifted(self, offset: float) -> "Segment":
        return Segment(self.start + offset, self.end + offset, tuple(w.shifted(offset) for w in self.words))


def join_words(words: list[Word] | tuple[Word, ...]) -> str:
    """Caption text of consecutive words (Whisper's words carry their own spaces)."""
    return "".join(w.text for w in words).strip()


@dataclass(frozen=True)
class TranscribeJob:
    """One stream's request to the ASR: its audio buffer (16 kHz float32), the committed text to prompt with.

    For AlignAtt-style decoding, `prefix` is text already committed for this buffer (forced, not
    decoded again; only the words after it come back), and `stop_before_end` (seconds) ends the
    decoding at the first token whose attention reaches that close to the end of the audio."""

    audio: np.ndarray
    prompt: str = ""
    language: str | None = None
    prefix: str = ""
    stop_before_end: float | None = None


# A streaming step that may ask the ASR for transcriptions: it yields jobs, is sent
# back each job's segments, and returns its result. The device scheduler drives many
# such steps at once and answers their jobs in batches; `drive` answers one directly.
Steps = Generator[TranscribeJob, list[Segment], "object"]


def drive(steps: Generator[TranscribeJob, list[Segment], T], transcribe: Callable[[TranscribeJob], list[Segment]]) -> T:
    """Run `steps` to its end, answering each job with `transcribe(job)`; returns the step's result."""
    try:
        job = next(steps)
        while True:
            job = steps.send(transcribe(job))
    except StopIteration as stop:
        return stop.value
