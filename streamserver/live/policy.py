"""LocalAgreement-2: when to trust a word enough to show it as final.

Whisper re-transcribes the growing audio buffer; a word is committed once two
consecutive hypotheses agree on it (the longest common prefix). Committed text
prompts the next call, and the buffer is cut at a segment end once its words
are committed, so it never grows without bound. The shape follows
whisper_streaming's `HypothesisBuffer` + `OnlineASRProcessor`, with typed words.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace

import numpy as np

from backends.asr_types import (DECODE_SECONDS, SENTENCE_END, Segment, TranscribeJob, TranscribeTogether, Word,
                                drive, join_words, without_repeats)
from backends.free_ending import with_free_ending

SAMPLE_RATE = 16000

# transcribe(audio, prompt) -> segments with times relative to the audio's start
Transcribe = Callable[[np.ndarray, str], list[Segment]]


# Two hypotheses agree on a word when they say it at about the same place in the audio. The same
# word seconds apart is two different words: a decode that skipped a stretch of a long buffer put
# "the room" 6 s after "of" where the hypothesis before had it right after; committing it there
# would also push the committed time past the skipped words, losing them for good.
SAME_PLACE_SECONDS = 1.0
# A window that ends inside the buffer may end inside a word: its words ending this close to the
# window's end are left for the next decode, which hears them whole.
EDGE_SECONDS = 0.5
# How long a heard word may wait for two hypotheses to agree on it: a word that ended this long
# before the end of the audio a decode heard is committed as that decode says it. Hypotheses that
# keep disagreeing (a word spelt two ways in turn, a phrase timed differently each time) otherwise
# held every word after them, seconds at a time, until the utterance ended: in a two-person call,
# words 6-8 s after they were spoken. The newest decode heard the most context around the word.
MAX_PENDING_SECONDS = 2.0
# A decode that says nothing after a committed sentence end while it heard this much audio after it:
# the buffer is cut at that end. A long buffer's decode often stops at a sentence end it already
# said, skipping the speech after it (a 12-s buffer ending "... painful to myself." left "He began a
# confused complaint" out of three decodes in a row, and the words waited for the utterance's end:
# 7 s in a server's run); the same speech at the start of a buffer is heard. After a pause this
# long, the audio before it is no context the next sentence needs (its text is in the prompt).
STALLED_SECONDS = 1.5


def agreed_prefix(old: list[Word], new: list[Word], max_shift: float = math.inf) -> int:
    """How many leading words two consecutive hypotheses share: the same word (case and punctuation
    aside), at most `max_shift` seconds apart."""
    n = 0
    for a, b in zip(old, new):
        if a.key != b.key or abs(a.start - b.start) > max_shift:
            break
        n += 1
    return n


class HypothesisBuffer:
    """The words of the last hypothesis not yet committed, and the agreement rule (same words,
    in the same places)."""

    def __init__(self, committed_until: float = 0.0,
                 keep: Callable[[list[Word]], list[Word]] = list) -> None:
        self.committed_until = committed_until
        self.keep = keep  # what of an agreed run is committed (the policy's repeat guard)
        self.recent_committed: list[Word] = []  # committed words still inside the audio buffer
        self.pending: list[Word] = []  # previous hypothesis, after its committed prefix

    def insert(self, words: list[Word], heard_until: float = -math.inf) -> list[Word]:
        """Commit the prefix `words` shares with the previous hypothesis, and after it every word that
        ended `MAX_PENDING_SECONDS` before `heard_until` (the end of the audio this decode heard
        whole; by default none has); keep the rest pending."""
        new = [w for w in words if w.start > self.committed_until - 0.1]
        new = self._drop_repeated_head(new)
        agreed = agreed_prefix(self.pending, new, SAME_PLACE_SECONDS)
        while agreed < len(new) and new[agreed].end <= heard_until - MAX_PENDING_SECONDS:
            agreed += 1
        commit, self.pending = new[:agreed], new[agreed:]
        return self._committed(commit)

    def flush(self) -> list[Word]:
        """Commit everything pending (end of an utterance: no later hypothesis will come)."""
        commit, self.pending = self.pending, []
        return self._committed(commit)

    def forget_before(self, t: float) -> None:
        """The audio before `t` left the buffer: its committed words can no longer repeat."""
        self.recent_committed = [w for w in self.recent_committed if w.end > t]

    def _committed(self, words: list[Word]) -> list[Word]:
        """The audio up to the run's end is done with, even where `keep` drops a repeat."""
        if words:
            self.committed_until = words[-1].end
            words = self.keep(words)
            self.recent_committed.extend(words)
        return words

    def _drop_repeated_head(self, new: list[Word]) -> list[Word]:
        """Whisper often repeats the last committed words at the start of the buffer: drop
        a 1-5 word n-gram that matches the committed tail, when it starts near it."""
        if not new or abs(new[0].start - self.committed_until) >= 1.0:
            return new
        tail = self.recent_committed
        for n in range(min(5, len(tail), len(new)), 0, -1):
            if [w.key for w in tail[-n:]] == [w.key for w in new[:n]]:
                return new[n:]
        return new


@dataclass(frozen=True)
class PolicyOutput:
    committed: list[Word]
    tentative: list[Word]


@dataclass(frozen=True)
class EndingCheck:
    """An utterance's last decode, conditioned on committed text, waiting for a free decode of the
    same audio to say whether the speaker went on after its last word (`UtteranceBuffer.ending_steps`)."""

    audio: np.ndarray
    offset: float  # stream time of audio[0]
    language: str | None
    prefix: str  # text forced before the decode's words (AlignAtt), else ""
    prefix_end: float  # stream time where the prefix's words end
    words: list[Word]  # what the decode said after the prefix (stream times)
    held: Word | None = None  # its last word, committed with the ending (its punctuation may change)
    heard: tuple[Word, ...] | None = None  # the free decode's words (stream times), when it ran beside it


class UtteranceBuffer:
    """What both streaming policies keep of an utterance: its audio since `offset` (stream
    seconds), how much of it Whisper has seen, and the committed text for prompting."""

    def __init__(self, trim_seconds: float, max_buffer_seconds: float, prompt_chars: int,
                 language: str | None) -> None:
        self.language = language
        self.trim_seconds = trim_seconds
        self.max_buffer_seconds = max_buffer_seconds
        self.prompt_chars = prompt_chars
        self.context = ""  # committed text of the whole stream, for prompting
        self.said: list[str] = []  # keys of the last committed words, across utterances
        self.said_until = 0.0  # stream time where the last committed word ends (a dropped repeat too)
        self.ending: EndingCheck | None = None
        self.start(0.0)

    def start(self, offset: float) -> None:
        self.offset = offset
        self.audio = np.zeros(0, dtype=np.float32)
        self.processed_samples = 0

    def insert_audio(self, audio: np.ndarray) -> None:
        self.audio = np.concatenate([self.audio, audio.astype(np.float32, copy=False)])

    @property
    def window(self) -> np.ndarray:
        """The audio the next decode hears: the buffer, or its first `DECODE_SECONDS` when a stream
        that fell behind has more (the rest waits for the next decode; it is never cut unheard)."""
        return self.audio[: int(DECODE_SECONDS * SAMPLE_RATE)]

    @property
    def heard_all(self) -> bool:
        return self.processed_samples >= len(self.audio)

    @property
    def awaits_confirmation(self) -> bool:
        """Words are shown that a decode of the same audio may still commit (each policy says which)."""
        return True

    @property
    def buffer_seconds(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    @property
    def end_time(self) -> float:
        return self.offset + self.buffer_seconds

    @property
    def processed_until(self) -> float:
        return self.offset + self.processed_samples / SAMPLE_RATE

    @property
    def unprocessed_seconds(self) -> float:
        return (len(self.audio) - self.processed_samples) / SAMPLE_RATE

    def end_at(self, t: float) -> None:
        """The utterance's speech ended at stream time `t`: drop the pause after it, so the last
        decode does not run over seconds of silence (where Whisper invents words)."""
        n = max(0, int(round((t - self.offset) * SAMPLE_RATE)))
        if n < len(self.audio):
            self.audio = self.audio[:n]
            self.processed_samples = min(self.processed_samples, n)

    def ending_steps(self) -> Generator[TranscribeJob, list[Segment], list[Word]]:
        """The last utterance's ending, checked: its last decode was conditioned on committed text
        (a prompt; AlignAtt's forced prefix, decoded without timestamps), and so conditioned Whisper
        can end its text before the audio ends (the CHILDES recording's last decode ended "... things
        to say." where the father goes on "to say to it?", in both policies, while openai-whisper's
        `transcribe` of the same audio, free of both, says "... to say to me?"). Nothing decodes that
        audio after the last decode, so a free decode of it is the check: the words it hears after
        the conditioned decode's last word are committed (`backends/free_ending.py`). It runs after the
        utterance's words are shown, in a round of its own: it costs a whole decode of the buffer,
        while AlignAtt's last decode is a few tokens, and the words before it need not wait for it."""
        check, self.ending = self.ending, None
        if check is None:
            return []
        if check.heard is not None:  # decoded beside the decode it checks (`TranscribeTogether`)
            heard = list(check.heard)
        else:
            answer = yield self._free_job(check.audio, f"{check.prefix} {join_words(check.words)}")
            heard = [w.shifted(check.offset) for s in answer for w in s.words]
        joined = with_free_ending(check.prefix, check.words, heard, check.prefix_end)
        words = self._once(joined[len(check.words):])
        self._remember(words)
        if check.held is None:
            return words
        # The held word as the free decode spells it, when it goes on after it ("say." -> "say").
        return [joined[len(check.words) - 1] if words else check.held] + words

    @property
    def ending_decoded(self) -> bool:
        """The ending's free decode already ran (beside the utterance's last decode): checking it needs
        no model."""
        return self.ending is not None and self.ending.heard is not None

    def _free_job(self, audio: np.ndarray, said: str) -> TranscribeJob:
        """The free decode that checks an ending; `said`: the checked decode's text (the draft: most
        likely said again)."""
        return TranscribeJob(audio, "", self.language, whole_window=True, draft=said)

    def decode_ahead_steps(self, end: float) -> Generator[TranscribeJob, list[Segment], None]:
        """The utterance may end at stream time `end` (a pause is under way): decode now what its end
        would decode then (`LocalAgreementPolicy`); by default nothing."""
        return
        yield

    def finish_all_steps(self) -> Generator[TranscribeJob, list[Segment], list[Word]]:
        """End of the utterance and its ending checked, in one go (for callers that show nothing
        in between)."""
        committed = yield from self.finish_steps()
        return committed + (yield from self.ending_steps())

    def _hold_last(self, committed: list[Word]) -> list[Word]:
        """`committed` (an utterance's last words) less its last word when that is the last word of the
        decode whose ending is checked: it is committed with the ending, so that a sentence the speaker
        went on with does not read "to say. to me." (committed text never changes)."""
        if self.ending is None or not committed or not self.ending.words or committed[-1] != self.ending.words[-1]:
            return committed
        self.ending = replace(self.ending, held=committed[-1])
        return committed[:-1]

    def _ending_of(self, job: TranscribeJob, words: list[Word]) -> EndingCheck:
        """What checking the ending of `job` (a decode that heard the buffer to its end and said
        `words`, stream times) needs, should it be the utterance's last."""
        return EndingCheck(job.audio, self.offset, job.language, job.prefix, self.offset + job.prefix_end,
                           [w for w in words if w.text.strip()])

    def _once(self, words: list[Word]) -> list[Word]:
        """What a decode would commit, less every run that repeats what was just committed. Every
        commit of both policies passes here, before it becomes the prompt (and AlignAtt's forced
        prefix): a loop the reader never saw must not be what Whisper is conditioned on either,
        or the next decode continues it ("Want your naked? Want your naked?" in the prompt gave a
        whole utterance of "Do you want a kiss? Yes." twice). Committed text is final, so a loop
        can never be undone: real speech almost never says three words twice in a row."""
        if words:
            self.said_until = max(self.said_until, words[-1].end)
        words = without_repeats(words, self.said)
        self.said = (self.said + [w.key for w in words])[-64:]
        return words

    def _cut_said(self, said_before: float) -> None:
        """Drop the audio a decode is done with, all it says being committed: up to its last word
        (speech after it was not reached and is decoded next); all it heard, if it said nothing new
        (`said_until` was `said_before` when it began)."""
        self._cut(self.said_until if self.said_until > said_before else self.processed_until)

    def _remember(self, words: list[Word]) -> None:
        if words:
            self.context = (self.context + "".join(w.text for w in words))[-4 * self.prompt_chars:]

    def _cut(self, t: float) -> None:
        """Drop the audio before stream time `t`."""
        n = int(round((t - self.offset) * SAMPLE_RATE))
        n = max(0, min(n, len(self.audio)))
        self.audio = self.audio[n:]
        self.processed_samples = max(0, self.processed_samples - n)
        self.offset += n / SAMPLE_RATE


class LocalAgreementPolicy(UtteranceBuffer):
    """One utterance's streaming transcription: insert audio, process, finish.

    `start(t)` begins a new utterance at stream time `t` (the VAD calls it);
    times in every output are stream times. `process_steps` and `finish_steps`
    yield their Whisper call as a `TranscribeJob` so that the device scheduler
    can batch it with other streams' calls; `process` and `finish` answer it
    with `transcribe` directly.
    """

    def __init__(
        self,
        transcribe: Transcribe | None = None,
        trim_seconds: float = 15.0,
        max_buffer_seconds: float = 25.0,
        prompt_chars: int = 200,
        language: str | None = None,
        searched_finals: bool = False,
    ) -> None:
        self.transcribe = transcribe
        # The engine searches an utterance's last decode harder than the others (`--final-beam-size`):
        # then words still pending at its end are decoded once more, even with no new audio (the same
        # greedy decode again would only say them again).
        self.searched_finals = searched_finals
        super().__init__(trim_seconds, max_buffer_seconds, prompt_chars, language)

    def start(self, offset: float) -> None:
        super().start(offset)
        self.hypothesis = HypothesisBuffer(committed_until=offset, keep=self._once)
        self._last_decode: EndingCheck | None = None
        self._ahead: tuple[tuple, list] | None = None  # (what a final decode asks, its answers): `decode_ahead_steps`

    @property
    def awaits_confirmation(self) -> bool:
        """The last hypothesis's uncommitted words: the next decode commits those it says again."""
        return bool(self.hypothesis.pending)

    # -- the three verbs ------------------------------------------------
    def process(self) -> PolicyOutput:
        return drive(self.process_steps(), self._answer)

    def finish(self) -> list[Word]:
        return drive(self.finish_all_steps(), self._answer)

    def process_steps(self, final: bool = False) -> Generator[TranscribeJob, list[Segment], PolicyOutput]:
        """Transcribe the buffer once; commit what the last two hypotheses agree on. `final`: the
        utterance's last decode (everything it says is committed)."""
        window, said_before = self.window, self.said_until
        self.processed_samples = len(window)
        job = self._job(window, final)
        ahead, self._ahead = self._ahead, None
        if final and ahead is not None and ahead[0] == self._asked(job):
            conditioned, free = ahead[1]  # decoded during the pause that ended the utterance
        elif final and self.heard_all:
            conditioned, free = yield from self._last_decode_steps(job)
        else:
            conditioned, free = (yield job), None
        heard = None if free is None else tuple(w.shifted(self.offset) for s in free for w in s.words)
        segments = [s.shifted(self.offset) for s in conditioned]
        words = [w for s in segments for w in s.words]
        # The decode that heard the buffer to its end is the utterance's last, if the utterance ends
        # now; without a prompt it was a free decode already.
        self._last_decode = None
        if self.heard_all and job.prompt:
            self._last_decode = replace(self._ending_of(job, words), heard=heard)
        heard_until = self.processed_until
        if not self.heard_all:  # the window ends inside the buffer, maybe inside a word: hear it again
            heard_until -= EDGE_SECONDS
            words = [w for w in words if w.end <= heard_until]
        committed = self.hypothesis.insert(words, heard_until)
        self._remember(committed)
        if self.buffer_seconds > self.max_buffer_seconds:
            # No segment end was agreed on for too long: take the hypothesis as it is, and keep the
            # audio after its last word (speech the decode did not reach is decoded next time).
            committed = committed + self._flush()
            self._cut_said(said_before)
        elif self._stalled(heard_until):
            self._cut(self.hypothesis.committed_until)
        elif self.buffer_seconds > self.trim_seconds:
            self._trim_at_segment(segments)
        return PolicyOutput(committed, list(self.hypothesis.pending))

    def finish_steps(self) -> Generator[TranscribeJob, list[Segment], list[Word]]:
        """End of the utterance: decode what arrived since the last decode (a decode committed without
        a second hypothesis, which the engine may search harder), then commit everything."""
        committed: list[Word] = []
        if not self.heard_all or (self.searched_finals and self.hypothesis.pending):
            while True:
                said_before = self.said_until
                committed += (yield from self.process_steps(final=True)).committed
                if self.heard_all:
                    break
                committed += self._flush()  # a stream that fell behind: audio past the window is left
                self._cut_said(said_before)
        committed += self._flush()
        self.ending = self._last_decode
        self.start(self.end_time)
        return self._hold_last(committed)

    def decode_ahead_steps(self, end: float) -> Generator[TranscribeJob, list[Segment], None]:
        """A pause is under way that ends the utterance at stream time `end` if it lasts: the utterance's
        last decode (and its ending check) of the audio up to `end`, run now, while the pause is still
        being heard; `finish_steps` takes the answers when the utterance ends there with nothing
        committed since (the same job), and the turn closes without waiting for a decode."""
        n = int(round((end - self.offset) * SAMPLE_RATE))
        if n <= self.processed_samples or n > min(len(self.audio), int(DECODE_SECONDS * SAMPLE_RATE)):
            return  # nothing new to hear at the end, or a buffer past one window (a stream that fell behind)
        job = self._job(self.audio[:n], final=True)
        self._ahead = (self._asked(job), (yield from self._last_decode_steps(job)))

    def _job(self, window: np.ndarray, final: bool) -> TranscribeJob:
        """A decode of `window` (the buffer from its start): prompted with the committed text before it,
        drafted with the last hypothesis. An utterance's last decode (`final`), committed with no later
        decode to check it (as its ending check is), is encoded as Whisper was trained, in 30 s: in 15-s
        windows the CHILDES father's "... things to say to it?" ended "thing to decide with"."""
        return TranscribeJob(window, self._prompt(), self.language, final=final, again=not final,
                             whole_window=final, draft=self._draft())

    def _last_decode_steps(self, job: TranscribeJob) -> Generator[TranscribeJob | TranscribeTogether, list,
                                                                 tuple[list[Segment], list[Segment] | None]]:
        """An utterance's last decode; when it is prompted, beside it (`TranscribeTogether`: one encode)
        the free decode that checks its ending. Their segments (the free one's None when not run)."""
        if not job.prompt:
            return (yield job), None
        conditioned, free = yield TranscribeTogether((job, self._free_job(job.audio, job.draft)))
        return conditioned, free

    def _asked(self, job: TranscribeJob) -> tuple:
        """What makes two final decodes the same: their audio (where it starts and ends) and prompt."""
        return self.offset, len(job.audio), job.prompt, job.language

    # -- helpers ----------------------------------------------------------
    def _answer(self, job: TranscribeJob) -> list[Segment]:
        if self.transcribe is None:
            raise RuntimeError("no transcribe function: drive process_steps() from a scheduler")
        return self.transcribe(job.audio, job.prompt)

    def _flush(self) -> list[Word]:
        words = self.hypothesis.flush()
        self._remember(words)
        return words

    def _prompt(self) -> str:
        """Committed text that is no longer in the audio buffer (so it isn't transcribed twice)."""
        inside = join_words(self.hypothesis.recent_committed)
        text = self.context
        if inside and text.rstrip().endswith(inside):
            text = text.rstrip()[: -len(inside)]
        return text[-self.prompt_chars:].strip()

    def _draft(self) -> str:
        """The last hypothesis of the buffer's audio (its committed words, then those waiting): what
        the next decode says first, most of the time."""
        return join_words(self.hypothesis.recent_committed + self.hypothesis.pending)

    def _stalled(self, heard_until: float) -> bool:
        """The decode said nothing past the committed words, which end a sentence `STALLED_SECONDS`
        or more before the end of what it heard."""
        done = self.hypothesis.recent_committed
        return (not self.hypothesis.pending and bool(done) and done[-1].text.rstrip().endswith(SENTENCE_END)
                and heard_until - self.hypothesis.committed_until >= STALLED_SECONDS)

    def _trim_at_segment(self, segments: list[Segment]) -> None:
        """Cut the buffer at the last segment end that is already committed (never the last segment),
        else at the last committed sentence end. Whisper often times a long buffer as one segment:
        without the second rule the buffer grows to `max_buffer_seconds`, and long buffers are where
        a decode skips seconds of speech."""
        ends = [s.end for s in segments[:-1] if s.end <= self.hypothesis.committed_until]
        if not ends:  # cut at the start of the word after the sentence, so no pause opens the new buffer
            done = self.hypothesis.recent_committed
            ends = [nxt.start for w, nxt in zip(done, done[1:]) if w.text.rstrip().endswith(SENTENCE_END)]
        if ends:
            self._cut(ends[-1])

    def _cut(self, t: float) -> None:
        super()._cut(t)
        self.hypothesis.forget_before(self.offset)
