"""AlignAtt: commit what Whisper has heard, decode only what is new.

SimulStreaming's policy: Whisper decodes with the text already committed for the
audio buffer forced as a prefix, and stops at the first new token whose
cross-attention (the alignment heads) reaches into the last `frame_threshold`
seconds of the audio received so far: past that point it would be guessing. The
words before the stop are committed at once, so there is no second hypothesis
to wait for and no re-decoding of the whole buffer (LocalAgreement-2 decodes
every word of the buffer on each update). The last new word is held back while
its attention sits near the end of the audio (it may still grow: "Ameri" →
"Americans"). The buffer is cut at a committed clause end once it is longer than
`trim_seconds`; committed text before the cut becomes the prompt.

Same verbs and times as `LocalAgreementPolicy`, so the session drives either.
"""
from __future__ import annotations

from collections.abc import Generator

from backends.asr_types import Segment, TranscribeJob, Word, join_words

from .policy import PolicyOutput, UtteranceBuffer

CLAUSE_END = (".", "?", "!", ",", ";", ":")


class AlignAttPolicy(UtteranceBuffer):
    def __init__(
        self,
        frame_threshold: float = 0.5,
        trim_seconds: float = 15.0,
        max_buffer_seconds: float = 25.0,
        prompt_chars: int = 200,
        language: str | None = None,
    ) -> None:
        self.frame_threshold = frame_threshold
        super().__init__(trim_seconds, max_buffer_seconds, prompt_chars, language)

    def start(self, offset: float) -> None:
        super().start(offset)
        self.committed: list[Word] = []  # committed words still inside the buffer (stream times)

    def process_steps(self, final: bool = False) -> Generator[TranscribeJob, list[Segment], PolicyOutput]:
        """Decode past the committed prefix; commit what the attention says was heard."""
        self.processed_samples = len(self.audio)
        job = TranscribeJob(self.audio, self._prompt(), self.language, prefix=join_words(self.committed),
                            stop_before_end=None if final else self.frame_threshold)
        answer = yield job
        words = [w.shifted(self.offset) for s in answer for w in s.words]
        words = [w for w in words if w.text.strip()]
        tentative: list[Word] = []
        if words and not final and words[-1].end >= self.end_time - self.frame_threshold - 0.3:
            tentative = [words.pop()]  # may still be growing
        self.committed.extend(words)
        self._trim()
        return PolicyOutput(words, tentative)

    def finish_steps(self) -> Generator[TranscribeJob, list[Segment], list[Word]]:
        """End of the utterance: decode to the end of the audio and commit everything."""
        committed: list[Word] = []
        if len(self.audio):  # the held-back word, and any audio since the last update
            committed = (yield from self.process_steps(final=True)).committed
        self._remember(self.committed)
        self.start(self.end_time)
        return committed

    # -- helpers ----------------------------------------------------------
    def _prompt(self) -> str:
        return self.context[-self.prompt_chars:].strip()

    def _trim(self) -> None:
        """Cut the buffer at the last committed clause end (any committed word end when far too long)."""
        if self.buffer_seconds <= self.trim_seconds or not self.committed:
            return
        cut = None
        for i, w in enumerate(self.committed):
            if w.text.rstrip().endswith(CLAUSE_END):
                cut = i
        if cut is None and self.buffer_seconds > self.max_buffer_seconds:
            cut = len(self.committed) - 1
        if cut is None:
            return
        gone, self.committed = self.committed[: cut + 1], self.committed[cut + 1:]
        self._remember(gone)
        self._cut(gone[-1].end)
