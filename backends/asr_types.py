"""What an ASR backend hands to a streaming policy: words with times, grouped in segments.

Plain values, so policies are tested with hand-made hypotheses.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

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
