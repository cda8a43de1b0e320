"""Attribution: which speaker said each committed word.

Committed words wait here until the diarizer has covered their time span;
then each goes to the speaker whose turns overlap it most. Backend labels are
renumbered 1, 2, ... in order of first appearance, so clients see stable,
small numbers whatever the backend calls its speakers.
"""
from __future__ import annotations

from dataclasses import dataclass

from backends.asr_types import Word, join_words
from backends.diarization_types import SpeakerTurn

from .captions import SILENCE_SPEAKER

# A word no turn overlaps takes the nearest turn's speaker if one is this close.
NEAREST_TURN_SECONDS = 1.0
# A word's line spans its speaker's turns this close to it: the diarizer hears speech Whisper writes
# no word for (far-field, mumbled, cut short), and word times from attention are tight. A line that
# stops at its last word leaves that speech to nobody; one that spans the turn gives it to its speaker.
TURN_REACH_SECONDS = 0.5


@dataclass(frozen=True)
class Silence:
    """A silence between waiting words: it queues behind them so lines stay in time order."""

    start: float
    end: float


class SpeakerAttribution:
    def __init__(self) -> None:
        self.turns: list[SpeakerTurn] = []
        self.covered_until = 0.0
        self.waiting: list[Word | Silence] = []
        self.numbers: dict[int, int] = {}
        self.last_number: int | None = None
        self.last_word: tuple[Word, int | None] | None = None  # the last word given out, and its label

    def add_turns(self, turns: list[SpeakerTurn], covered_until: float) -> None:
        self.turns.extend(turns)
        self.covered_until = max(self.covered_until, covered_until)

    def add_words(self, words: list[Word]) -> None:
        self.waiting.extend(words)

    def add_silence(self, start: float, end: float) -> None:
        """Queue a silence behind the waiting words (extending the queued one when it is the same)."""
        last = self.waiting[-1] if self.waiting else None
        if isinstance(last, Silence) and last.start == start:
            self.waiting[-1] = Silence(start, max(end, last.end))
        else:
            self.waiting.append(Silence(start, end))

    def take_ready(self, everything: bool = False) -> list[tuple[Word | Silence, int, tuple[float, float]]]:
        """Words whose time the diarizer has covered (all of them with `everything`), with speaker
        numbers and the span of their speaker's turns around them (`TURN_REACH_SECONDS`), and the
        silences between them (speaker -2), in time order."""
        ready: list[tuple[Word | Silence, int, tuple[float, float]]] = []
        while self.waiting:
            item = self.waiting[0]
            if isinstance(item, Silence):
                ready.append((self.waiting.pop(0), SILENCE_SPEAKER, (item.start, item.end)))
            elif everything or item.end <= self.covered_until:
                label = self._label_of(item)
                ready.append((self.waiting.pop(0), self._number(label), self._span(item, label)))
                self.last_word = (item, label)
            else:
                break
        if ready:
            self._forget_turns_before(ready[-1][0].start - NEAREST_TURN_SECONDS)
        return ready

    def reach_of_last(self) -> float | None:
        """Where the turn of the last word given out ends, as far as the diarizer has heard now: its
        line may end there (the turn's end arrives after the word, the diarizer being behind)."""
        if self.last_word is None:
            return None
        return self._span(*self.last_word)[1]

    @property
    def waiting_text(self) -> str:
        return join_words([w for w in self.waiting if isinstance(w, Word)])

    def _number(self, label: int | None) -> int:
        if label is None:
            number = self.last_number or 1
        else:
            number = self.numbers.setdefault(label, len(self.numbers) + 1)
        self.last_number = number
        return number

    def _label_of(self, word: Word) -> int | None:
        overlap: dict[int, float] = {}
        for t in self.turns:
            o = min(t.end, word.end) - max(t.start, word.start)
            if o > 0:
                overlap[t.speaker] = overlap.get(t.speaker, 0.0) + o
        if overlap:
            return max(overlap, key=lambda k: (overlap[k], -k))
        nearest = min(self.turns, key=lambda t: _gap(t, word), default=None)
        if nearest is not None and _gap(nearest, word) <= NEAREST_TURN_SECONDS:
            return nearest.speaker
        return None

    def _span(self, word: Word, label: int | None) -> tuple[float, float]:
        """The speaker's turn around the word: their turns that touch it or each other (gaps under
        `TURN_REACH_SECONDS`). A streaming diarizer gives a turn out in pieces as it hears it, so one
        turn is the chain of its pieces, not only the pieces next to the word."""
        start, end = word.start, word.end
        mine = [t for t in self.turns if t.speaker == label]
        for t in sorted(mine, key=lambda t: t.start):  # forwards, as far as the pieces touch
            if t.start - end >= TURN_REACH_SECONDS:
                break
            if t.end > start - TURN_REACH_SECONDS:
                start, end = min(start, t.start), max(end, t.end)
        for t in sorted(mine, key=lambda t: t.end, reverse=True):  # and backwards
            if start - t.end >= TURN_REACH_SECONDS:
                break
            if t.start < end + TURN_REACH_SECONDS:
                start = min(start, t.start)
        return start, end

    def _forget_turns_before(self, t: float) -> None:
        self.turns = [turn for turn in self.turns if turn.end >= t]


def _gap(turn: SpeakerTurn, word: Word) -> float:
    return max(turn.start - word.end, word.start - turn.end, 0.0)
