"""Attribution: committed words and silences become caption lines.

A line is one speaker's run of words; a long enough silence is a line of its
own (speaker -2). Lines only grow at the end: a committed line's text never
changes, which is what lets clients render them once.

With speakers (a diarizer), a line is a speaker's turn: it spans the turn the
diarizer heard around its words (`span`), not only the words, and a speaker's
words `turn_gap` seconds or more after their previous word start a new line.
"""
from __future__ import annotations

from dataclasses import replace

from backends.asr_types import Word

from .captions import SILENCE_SPEAKER, Line, SpokenWord


class Transcript:
    def __init__(self, turn_gap: float | None = None) -> None:
        self.lines: list[Line] = []
        self.words: list[SpokenWord] = []  # every committed word, with its speaker
        self.turn_gap = turn_gap

    def add_words(self, words: list[Word], speaker: int = 1, span: tuple[float, float] | None = None) -> None:
        """`span`: the stretch of the speaker's turn around these words (the line covers it)."""
        for w in words:
            lo, hi = (min(span[0], w.start), max(span[1], w.end)) if span else (w.start, w.end)
            last = self.lines[-1] if self.lines else None
            if last is not None and last.speaker == speaker and not self._new_turn(w):
                text = (last.text + w.text) if last.text else w.text.strip()
                self.lines[-1] = replace(last, text=text.strip(), end=max(last.end, hi))
            else:
                start = self._new_line_start(lo, speaker)
                self.lines.append(Line(speaker, w.text.strip(), start, max(hi, start)))
            self.words.append(SpokenWord(w.text.strip(), w.start, w.end, speaker))

    def reach(self, end: float) -> None:
        """The last line's speaker went on speaking (without words) until `end`: the line ends there,
        when it is still the last one (a silence line after it closed it)."""
        last = self.lines[-1] if self.lines else None
        if last is not None and last.speaker != SILENCE_SPEAKER and end > last.end:
            self.lines[-1] = replace(last, end=end)

    def _new_line_start(self, start: float, speaker: int) -> float:
        """Lines follow one another in time. With speakers, another speaker's line may begin before
        the one before it ends, never before it begins: people talk over each other, and a line is
        its speaker's turn as the diarizer heard it. A speaker never overlaps their own line, and a
        silence line is a real gap: nothing begins inside either."""
        last = self.lines[-1] if self.lines else None
        if last is None:
            return start
        overlap = self.turn_gap is not None and last.speaker not in (speaker, SILENCE_SPEAKER)
        return max(start, last.start if overlap else last.end)

    def _new_turn(self, word: Word) -> bool:
        return self.turn_gap is not None and bool(self.words) and word.start - self.words[-1].end >= self.turn_gap

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
