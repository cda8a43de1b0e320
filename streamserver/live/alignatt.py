"""AlignAtt: commit what Whisper has heard, decode only what is new.

SimulStreaming's policy: Whisper decodes with the text already committed for the
audio buffer forced as a prefix, and stops at the first new token whose
cross-attention (the alignment heads) reaches into the last `frame_threshold`
seconds of the audio received so far: past that point it would be guessing. The
new words before the stop are shown at once, and committed once the next
decode, with a second more audio after them, says them again: Whisper's guess at
a word heard with half a second of right context is often wrong at the start of
an utterance ("I'd less" for "unless"), and committed text can never be taken
back. Only the words past the committed prefix are decoded again, so an update
costs a fraction of LocalAgreement-2's, which decodes every word of the buffer.
The last new word is held back while its attention sits near the end of the
audio (it may still grow: "Ameri" → "Americans"). The utterance's last decode
runs to the end of its audio, and stops at a token that attends past it, into
the window's padding: Whisper invents words there ("So let's check this out"
after a speaker's last sentence), while a word spoken in the audio's last
hundredths of a second still attends to the audio. Every decode also stops at a token whose attention jumps seconds back
before the committed words (the engine's `REWIND_SECONDS`): such text is
invented. The buffer is cut at a committed clause end once it is longer than
`trim_seconds`; committed text before the cut becomes the prompt.

Same verbs and times as `LocalAgreementPolicy`, so the session drives either.
"""
from __future__ import annotations

from collections.abc import Generator

from backends.asr_types import CLAUSE_END, Segment, TranscribeJob, Word, join_words

from .policy import PolicyOutput, UtteranceBuffer, agreed_prefix

# The last decode of an utterance stops at a token attending this close to the end of its audio:
# none, so only tokens attending to the padding after it. (SimulStreaming keeps 4 positions, 80 ms,
# but its attention never looks at the padding; a word ending the stream sits in those 80 ms.)
END_GUARD = 0.0


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
        self.held: list[Word] = []  # the last decode's new words, waiting for the next to agree

    def process_steps(self, final: bool = False) -> Generator[TranscribeJob, list[Segment], PolicyOutput]:
        """Decode past the committed prefix up to the attention frontier; commit the new words
        the previous decode also said (all of them on the utterance's last decode)."""
        window = self.window
        self.processed_samples = len(window)
        # Only a window that reaches the utterance's end decodes to its end; one that ends inside the
        # buffer (a stream that fell behind) stops at the frontier, as any other decode.
        job = TranscribeJob(window, self._prompt(), self.language, prefix=join_words(self.committed),
                            stop_before_end=END_GUARD if final and self.heard_all else self.frame_threshold,
                            prefix_end=self.committed[-1].end - self.offset if self.committed else 0.0,
                            final=final, again=not final, whole_window=True)
        answer = yield job
        words = [w.shifted(self.offset) for s in answer for w in s.words]
        words = [w for w in words if w.text.strip()]
        if final:
            commit, self.held = words, []
            if self.heard_all:  # decoded without timestamps, after a forced prefix: never a free decode
                self.ending = self._ending_of(job, words)
        else:
            agreed = agreed_prefix(self.held, words)
            if agreed == len(words) and words and words[-1].end >= self.end_time - self.frame_threshold - 0.3:
                agreed -= 1  # the word at the edge may still be growing
            commit, self.held = words[:agreed], words[agreed:]
        commit = self._once(commit)
        self.committed.extend(commit)
        self._trim()
        return PolicyOutput(commit, list(self.held))

    def finish_steps(self) -> Generator[TranscribeJob, list[Segment], list[Word]]:
        """End of the utterance: decode to the end of the audio and commit everything."""
        committed: list[Word] = []
        if len(self.audio):  # the held-back word, and any audio since the last update
            while True:
                said_before = self.said_until
                committed += (yield from self.process_steps(final=True)).committed
                if self.heard_all:
                    break
                self._remember(self.committed)  # a stream that fell behind: audio past the window is left
                self.committed = []
                self._cut_said(said_before)
        self._remember(self.committed)
        self.start(self.end_time)
        return self._hold_last(committed)

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
