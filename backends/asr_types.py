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


# Where a sentence or clause ends in Whisper's text: the places a policy may cut its audio buffer.
SENTENCE_END = (".", "?", "!")
CLAUSE_END = SENTENCE_END + (",", ";", ":")

# The most audio one decode hears: Whisper's 30-s window, less the second of silence the engine keeps
# after the audio (`batched_whisper.MIN_SILENCE_AFTER`; Whisper ends its text on that silence).
# Audio past it is not heard; a policy whose buffer grew longer (a stream that fell behind) decodes
# it in the next window.
DECODE_SECONDS = 29.0
MIN_LOOP_WORDS = 3  # a run of this many words said again straight after itself is a loop


def without_repeats(words: list[Word], before: list[str] | tuple[str, ...] = (), degenerate: bool = False) -> list[Word]:
    """`words` without every run of `MIN_LOOP_WORDS`+ words that repeats the run just before it
    (the first copy stays, and so does everything after the repeat). `before` is the keys of the
    words already said ahead of these. In `degenerate` text (a decode that failed its quality
    checks) a word or word pair said four times in a row is also cut to one.

    Whisper's loops, and a policy committing audio twice, both show as such repeats; real speech
    almost never says three words twice in a row, so dropping them costs nearly nothing."""
    keys, out = list(before), []
    for w in words:
        keys.append(w.key)
        out.append(w)
        for n in range(1, len(keys) // 2 + 1):
            if keys[-n:] != keys[-2 * n:-n] or not any(keys[-n:]):
                continue
            if n < MIN_LOOP_WORDS and not (degenerate and keys[-4 * n:] == keys[-n:] * 4 and len(keys) >= 4 * n):
                continue
            drop = min(n, len(out))
            del keys[-drop:], out[-drop:]
            break
    return out


def join_words(words: list[Word] | tuple[Word, ...]) -> str:
    """Caption text of consecutive words (Whisper's words carry their own spaces)."""
    return "".join(w.text for w in words).strip()


@dataclass(frozen=True)
class TranscribeJob:
    """One stream's request to the ASR: its audio buffer (16 kHz float32), the committed text to prompt with.

    For AlignAtt-style decoding, `prefix` is text already committed for this buffer (forced, not
    decoded again; only the words after it come back), and `stop_before_end` (seconds) ends the
    decoding at the first token whose attention reaches that close to the end of the audio (0: past
    its end, into the window's padding, where there is nothing to hear).
    `prefix_end` (seconds into the audio) is where the prefix's words were heard: a new token
    attending far before it is not hearing new speech (the engine's `REWIND_SECONDS`).
    `final`: the last decode of an utterance, committed as it comes back with no later decode to
    check it; the engine searches it harder (beam search, `backends/final_search.py`).
    `again`: a later decode of the stream hears this audio again (a live decode that is not its
    utterance's last, in both policies); one that fails the quality checks is not resampled at
    higher temperatures, the next decode being its second chance.
    `whole_window`: encoded in a 30-s window, as Whisper was trained, whatever the engine's
    `bucket_seconds` (a file's chunks, whose short last window lost words in 15 s; AlignAtt, whose
    stops read attention that moved in shorter windows; an utterance's last decode and its ending
    check, committed with no later decode to check them).
    `draft`: what a decode of this audio said a moment ago (the words from the audio's start), the
    text the decode will most likely say first; the engine checks it many tokens per decoder pass
    (`backends/draft.py`). The words that come back are the greedy decode's, draft or not."""

    audio: np.ndarray
    prompt: str = ""
    language: str | None = None
    prefix: str = ""
    stop_before_end: float | None = None
    prefix_end: float = 0.0
    final: bool = False
    again: bool = False
    whole_window: bool = False
    draft: str = ""


@dataclass(frozen=True)
class TranscribeTogether:
    """Jobs one step needs at the same time, answered together (a list of their answers, in order): an
    utterance's last decode and the free decode that checks its ending hear the same audio, so in one
    batch the engine encodes it once, and the turn ends one decode sooner (`BatchedWhisper.encode`)."""

    jobs: tuple[TranscribeJob, ...]


@dataclass(frozen=True)
class DecodeNow:
    """A stream's question to its round: "do other streams decode in this round?". A stream with part
    of a step's new audio asks it; answered yes, it decodes now, in their batch. After that decode
    the streams stay in step, every decode of theirs shares a batch, and a round serves all of them for
    little more than one: out of step, each stream's decode was a round of its own, and two streams
    filled two cores that one round of both would not."""


# A streaming step that may ask the ASR for transcriptions: it yields jobs, is sent
# back each job's segments, and returns its result. The device scheduler drives many
# such steps at once and answers their jobs in batches; `drive` answers one directly.
Steps = Generator[TranscribeJob, list[Segment], "object"]


def drive(steps: Generator[TranscribeJob, list[Segment], T], transcribe: Callable[[TranscribeJob], list[Segment]]) -> T:
    """Run `steps` to its end, answering each job with `transcribe(job)` (the jobs of a
    `TranscribeTogether` one by one, unless `transcribe.together` says it answers them in one batch);
    returns the step's result."""
    together = getattr(transcribe, "together", False)
    try:
        job = next(steps)
        while True:
            if isinstance(job, TranscribeTogether) and not together:
                job = steps.send([transcribe(j) for j in job.jobs])
            else:
                job = steps.send(transcribe(job))
    except StopIteration as stop:
        return stop.value
