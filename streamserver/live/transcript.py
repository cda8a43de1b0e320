"""Attribution: committed words and silences become caption lines.

A line is one speaker's run of words; a long enough silence is a line of its
own (speaker -2). Lines only grow at the end: a committed line's text never
changes, which is what lets clients render them once.
"""
from __future__ import annotations

from dataclasses import replace

from backends.asr_types import Word

from .captions import SILENCE_SPEAKER, Line, SpokenWord


class Transcript:
    def __init__(self) -> None:
        self.lines: list[Line] = []
        self.words: list[SpokenWord] = []  # every committed word, with its speaker

    def add_words(self, words: list[Word], speaker: int = 1) -> None:
        for w in words:
            self.words.append(SpokenWord(w.text.strip(), w.start, w.end, speaker))
            last = self.lines[-1] if self.lines else None
            if last is not None and last.speaker == speaker:
                text = (last.text + w.text) if last.text else w.text.strip()
                self.lines[-1] = replace(last, text=text.strip(), end=max(last.end, w.end))
            else:
                start = max(w.start, last.end) if last is not None else w.start
                self.lines.append(Line(speaker, w.text.strip(), start, max(w.end, start)))

    def add_silence(self, start: float, end: float) -> None:
        """A silence from `start` to `end`; extends the last line when that is the same silence."""
        last = self.lines[-1] if self.lines else None
        if last is not None and last.speaker == SILENCE_SPEAKER and start <= last.end + 1e-6:
            self.lines[-1] = replace(last, end=max(last.end, end))
            return
        if last is not None:
            start = max(start, last.end)
        if end > start:
            self.lines.append(Line(SILENCE_SPEAKER, "", start, end))

    def snapshot(self) -> tuple[Line, ...]:
        return tuple(self.lines)
