"""What a live session says, as plain values: caption lines, the words with their times and speakers,
and where each utterance began and ended. Protocol adapters render these; nothing here is a wire format.
"""
from __future__ import annotations

from dataclasses import dataclass

SILENCE_SPEAKER = -2


@dataclass(frozen=True)
class Line:
    """One caption line: a speaker's run of committed words, or a silence (`speaker == -2`)."""

    speaker: int
    text: str
    start: float
    end: float


@dataclass(frozen=True)
class SpokenWord:
    """A word as said: its text (no leading space), its stream times, and its speaker (1, 2, ...; 0 while
    not known)."""

    text: str
    start: float
    end: float
    speaker: int = 0


@dataclass(frozen=True)
class CaptionState:
    """Everything a stream has produced so far. The tuples are cumulative (they only grow), so an adapter
    that sees only some of the states (a slow client gets the newest) can still tell what is new."""

    lines: tuple[Line, ...] = ()
    buffer_transcription: str = ""
    buffer_diarization: str = ""
    remaining_transcription: float = 0.0
    remaining_diarization: float = 0.0
    speech_detected: bool = False
    words: tuple[SpokenWord, ...] = ()  # every committed word, in order
    tentative: tuple[SpokenWord, ...] = ()  # the words still forming (may change)
    speech_starts: tuple[float, ...] = ()  # stream seconds where each utterance began
    # ... and ended (one fewer while one is under way), told with the utterance's last word: after its
    # ending check, so that a turn's end (Deepgram's speech_final, OpenAI's completed) carries every word
    speech_ends: tuple[float, ...] = ()
    cuts: int = 0  # how many of the client's cuts (Finalize, commit) this state includes

    @property
    def in_speech(self) -> bool:
        return len(self.speech_starts) > len(self.speech_ends)
