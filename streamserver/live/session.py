"""One connection's pipeline state, from decoded audio to caption state.

A `Session` is a plain object owned by its connection. The event loop puts
decoded audio in its `AudioInbox`; the device scheduler drives `step()` and
`finish()` on its worker thread. Both are generators: they yield each model call
they need, a `VadJob` for the new audio's speech probabilities, a `DecodeNow`
when it could decode with the round's other streams, and a
`TranscribeJob` for each Whisper call (the scheduler batches the jobs of all
sessions and sends back the answers), then apply the streaming policy and
attribution and return the caption state to send. `answer_directly` answers a
single session's jobs without a scheduler. Nothing here touches the socket.
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from backends.asr_types import DecodeNow, Steps, TranscribeTogether, join_words
from backends.diarization_types import DiarizeJob
from backends.vad import WINDOW, SileroVAD, SpeechSegmenter, VadJob

from .attribution import SpeakerAttribution
from .alignatt import AlignAttPolicy
from .policy import SAMPLE_RATE, LocalAgreementPolicy
from .captions import SILENCE_SPEAKER, CaptionState, SpokenWord
from .transcript import Transcript


# A stream whose new speech is at least this share of `min_chunk_seconds` decodes in a round where
# other streams decode (`DecodeNow`).
JOIN_FRACTION = 0.5
# When a pause will end the utterance if it lasts this much longer, the utterance's last decode runs
# ahead (`decode_ahead_steps`), so that the turn's end waits for no decode: a little more than that
# decode takes on a 2-core CPU (a pair of tiny.en rows, one 30-s encode: about 0.17 s). Not before the
# pause has lasted `AHEAD_MIN_SILENCE`: the VAD's end of speech must have settled, and shorter pauses
# inside an utterance, which would waste the decode, are common.
AHEAD_SECONDS = 0.3
AHEAD_MIN_SILENCE = 0.2


@dataclass(frozen=True)
class SessionOptions:
    silence_line_seconds: float = 2.0
    min_chunk_seconds: float = 1.0  # audio a policy needs before another Whisper call
    language: str | None = None
    trim_seconds: float = 15.0  # a longer buffer is cut at its last committed clause end
    policy: str = "localagreement"  # or "alignatt"
    # A pause this long ends the utterance (its words are committed, the buffer starts anew).
    # Shorter pauses stay inside the buffer: Whisper hears a phrase with the speech around it, and
    # both policies commit the words before a pause anyway (the hypotheses stop changing). Over
    # the whole real-speech set, 2 s gave lower WER than Silero's 0.5 s (which cut phrases apart).
    # The VAD resolves it in 32-ms windows: the utterance ends at the end of the first window that
    # reaches it (`SpeechSegmenter.set_pause`; one window at the least). The vendor protocols set it
    # to the client's own turn detection (OpenAI's `silence_duration_ms`, Deepgram's `endpointing`).
    utterance_pause_seconds: float = 2.0
    # Speech probability that starts an utterance. Lower than Silero's 0.5: quiet, whispered, hoarse
    # and telephone-band speech scores lower, and a missed start loses words for good, while a
    # false start costs only compute (Whisper's no-speech check drops what is not speech).
    vad_threshold: float = 0.3


class AudioInbox:
    """Decoded audio waiting for the session's next step.

    The event loop `put`s, the device worker `take`s; deque appends and pops
    are atomic, so no lock is needed between the two.
    """

    def __init__(self) -> None:
        self._chunks: deque[np.ndarray] = deque()
        self.received_samples = 0
        self.taken_samples = 0

    def put(self, audio: np.ndarray) -> None:
        if audio.size:
            self._chunks.append(audio)
            self.received_samples += audio.size

    def take(self, until: int | None = None) -> np.ndarray:
        """Everything waiting, or only what arrived before sample `until` of the stream (a client's cut:
        the audio sent after it stays for the next step)."""
        chunks = []
        while self._chunks and (until is None or self.taken_samples < until):
            chunk = self._chunks.popleft()
            if until is not None and self.taken_samples + chunk.size > until:
                keep = until - self.taken_samples
                self._chunks.appendleft(chunk[keep:])  # the front again: put only appends at the back
                chunk = chunk[:keep]
            chunks.append(chunk)
            self.taken_samples += chunk.size
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)

    @property
    def received_seconds(self) -> float:
        return self.received_samples / SAMPLE_RATE


def answer_directly(models):
    """Answer one session's jobs one at a time with the device's models (benchmarks, tools)."""

    def answer(job):
        if isinstance(job, DecodeNow):
            return False  # no other stream
        if isinstance(job, VadJob):
            return models.vad.probabilities(job.state, job.audio)
        if isinstance(job, DiarizeJob):
            return models.diarizer.process_batch([job])[0]
        if isinstance(job, TranscribeTogether):
            return models.asr.transcribe_batch(list(job.jobs))
        return models.asr.transcribe_batch([job])[0]

    answer.together = True  # `drive` hands it a TranscribeTogether whole: one batch
    return answer


class Session:
    """`models` is the device's shared `DeviceModels` (asr, vad, and a diarizer or None)."""

    def __init__(self, inbox: AudioInbox, models, options: SessionOptions = SessionOptions()) -> None:
        self.inbox = inbox
        self.options = options
        self.vad: SileroVAD = models.vad
        self.vad_state = self.vad.new_state()
        self.segmenter = SpeechSegmenter(options.vad_threshold)
        self.segmenter.set_pause(options.utterance_pause_seconds)
        if options.policy == "alignatt":
            self.policy = AlignAttPolicy(trim_seconds=options.trim_seconds, language=options.language)
        else:
            self.policy = LocalAgreementPolicy(trim_seconds=options.trim_seconds, language=options.language,
                                               searched_finals=getattr(models.asr, "beam_size", 1) > 1)
        self.transcript = Transcript(turn_gap=options.silence_line_seconds if models.diarizer is not None else None)
        self.diarizer = models.diarizer
        self.diarizer_state = self.diarizer.new_state() if self.diarizer is not None else None
        self.attribution = SpeakerAttribution() if self.diarizer is not None else None
        self._lock = threading.Lock()  # step() and finish() never overlap
        # Audio after `_recent_start` (absolute sample index) not yet handed on: the VAD
        # moves a speech start back by its padding, so we keep a little history.
        self._recent = np.zeros(0, dtype=np.float32)
        self._recent_start = 0
        self._vad_samples = 0  # samples the VAD has seen
        self._fed_until = 0  # samples handed to the policy (absolute)
        self._in_speech = False
        self._speech_seen = False
        self._speech_end = 0  # absolute sample where the last speech ended (a silence line starts there)
        self._voiced_until = 0  # absolute sample where the last VAD window heard as speech ends
        self._fed_end = 0  # absolute sample up to which the last utterance was fed (the next starts after)
        self._tentative: list = []
        self._starts: list[float] = []  # stream seconds where each utterance began, and ended
        self._ends: list[float] = []  # (an utterance's end is told once its ending is checked)
        self._closing: float | None = None  # where the utterance whose ending waits for its check ended
        self._ahead_for: int | None = None  # the speech end the last decode ran ahead for
        self._cuts = 0

    # -- worker side ----------------------------------------------------
    def step(self) -> Steps:
        """Take in what arrived, run the VAD, and call Whisper when enough speech waits (first, the
        ending of an utterance that ended in the step before, `_check_ending`)."""
        with self._lock:
            yield from self._check_ending()
            yield from self._take_in()
            if self._in_speech and (yield from self._decode_due()):
                yield from self._check_ending()  # an utterance that ended in this step: its words first
                out = yield from self.policy.process_steps()
                self._commit(out.committed)
                self._tentative = out.tentative
            elif self._in_speech and self._end_near():
                self._ahead_for = self.segmenter.speech_end
                yield from self.policy.decode_ahead_steps(self._ahead_for / SAMPLE_RATE)
            self._attribute()
            self._note_silence(self._vad_samples)
            return self.state()

    @property
    def ending_pending(self) -> bool:
        """The last utterance's words are committed, but not yet what a free decode hears after them."""
        return self.policy.ending is not None

    def finish(self, check_ending: bool = True) -> Steps:
        """End of stream: everything still held is transcribed and committed. With `check_ending`
        false the last utterance's ending is left to `finish_ending`, so that the words before it can
        be sent first."""
        with self._lock:
            yield from self._take_in()
            tail_end = self._recent_start + len(self._recent)
            if self._in_speech:
                self._feed_policy(tail_end)
                if self.segmenter.speech_end is not None:  # the stream ends in a pause
                    self.policy.end_at(min(tail_end, self.segmenter.speech_end) / SAMPLE_RATE)
                yield from self._finish_utterance()
                self._in_speech = False
                self._ended(tail_end / SAMPLE_RATE)
                self._speech_end = self._fed_end = tail_end
            self._tentative = []
            if check_ending:
                yield from self._check_ending()
            if self.diarizer is not None:
                turns = yield DiarizeJob(self.diarizer_state, flush=True)
                self.attribution.add_turns(turns, tail_end / SAMPLE_RATE)
            self._attribute(everything=True)
            self._note_silence(tail_end)
            return self.state(final=True)

    def finish_ending(self) -> Steps:
        """After `finish(check_ending=False)`: the last utterance's ending, and the final state."""
        with self._lock:
            yield from self._check_ending()
            self._attribute(everything=True)
            self._note_silence(self._recent_start + len(self._recent))  # where the stream ended
            return self.state(final=True)

    def cut(self, until: int | None = None) -> Steps:
        """The client asks for everything heard so far now (Deepgram's `Finalize`, OpenAI's `commit`):
        the utterance under way ends here, as if the speaker had paused; the stream goes on, and the
        next speech starts a new utterance. `until`: the inbox's `received_samples` when the client cut;
        audio that arrived after it (the step may run seconds later on a busy device) is not taken in."""
        with self._lock:
            yield from self._take_in(until)
            if self._in_speech:
                self.segmenter.force_end()
                yield from self._speech_ends(self._vad_samples)
            yield from self._check_ending()  # the client asked for everything heard: not a step later
            self._cuts += 1
            self._attribute()
            return self.state()

    def retune(self, language: str | None = None, utterance_pause_seconds: float | None = None,
               prompt: str | None = None) -> None:
        """Settings a client may change while it streams (OpenAI's `session.update`): they apply from
        the next step. Each is one attribute write, safe beside the worker thread."""
        if language is not None:
            self.policy.language = language
        if utterance_pause_seconds is not None:
            self.segmenter.set_pause(utterance_pause_seconds)
        if prompt is not None and not self.policy.context:
            self.policy.context = prompt

    def state(self, final: bool = False) -> CaptionState:
        done = self.policy.processed_until if self._in_speech else self._vad_samples / SAMPLE_RATE
        received = self.inbox.received_seconds
        diarized = received if self.attribution is None else self.attribution.covered_until
        return CaptionState(
            lines=self.transcript.snapshot(),
            buffer_transcription="" if final else join_words(self._tentative),
            buffer_diarization="" if final or self.attribution is None else self.attribution.waiting_text,
            remaining_transcription=0.0 if final else received - done,
            remaining_diarization=0.0 if final else received - diarized,
            speech_detected=self._speech_seen,
            words=tuple(self.transcript.words),
            tentative=() if final else tuple(SpokenWord(w.text.strip(), w.start, w.end) for w in self._tentative),
            # An utterance that began after one whose end is not told yet is told after it.
            speech_starts=tuple(self._starts[:len(self._ends) + 1]),
            speech_ends=tuple(self._ends),
            cuts=self._cuts,
        )

    # -- internals --------------------------------------------------------
    def _take_in(self, until: int | None = None) -> Steps:
        audio = self.inbox.take(until)
        if not audio.size:
            return
        self._recent = np.concatenate([self._recent, audio])
        probs = yield VadJob(self.vad_state, audio)
        voiced = np.flatnonzero(np.asarray(probs) >= self.options.vad_threshold)
        if voiced.size:
            self._voiced_until = self._vad_samples + (int(voiced[-1]) + 1) * WINDOW
        if self.diarizer is not None and len(probs):
            a = self._vad_samples - self._recent_start
            windows = self._recent[a:a + len(probs) * WINDOW]
            turns = yield DiarizeJob(self.diarizer_state, windows, probs)
            self.attribution.add_turns(turns, self.diarizer_state.covered_until)
        for event in self.segmenter.push(probs):
            if event.kind == "start":
                self._speech_starts(max(event.sample, self._fed_end, self._recent_start))
            else:
                yield from self._speech_ends(event.sample)
        self._vad_samples += len(probs) * WINDOW
        if self._in_speech:
            self._feed_policy(self._vad_samples)
        self._forget_old_audio()

    def _decode_due(self) -> Generator[DecodeNow, bool, bool]:
        """Whether this step decodes: a whole `min_chunk_seconds` of new speech, or half of one when
        the round decodes other streams anyway (`DecodeNow`), so that the device's streams fall into
        step and share their decodes' batches. Not when the new audio is a pause and no word waits for a
        decode to confirm it: a decode of the same words over more silence could change nothing a
        client sees (a pause inside an utterance is up to `utterance_pause_seconds` long)."""
        if (self._voiced_until <= round(self.policy.processed_until * SAMPLE_RATE)
                and not self.policy.awaits_confirmation):
            return False
        waiting = self.policy.unprocessed_seconds
        if waiting >= self.options.min_chunk_seconds:
            return True
        if waiting >= JOIN_FRACTION * self.options.min_chunk_seconds:
            return bool((yield DecodeNow()))
        return False

    def _end_near(self) -> bool:
        """A pause under way will end the utterance within `AHEAD_SECONDS` if it lasts, and its last
        decode has not run ahead for it yet."""
        remaining, end = self.segmenter.pause_remaining, self.segmenter.speech_end
        if remaining is None or end is None or end == self._ahead_for:
            return False
        heard = end - self.segmenter.pad_samples
        return (remaining <= AHEAD_SECONDS * SAMPLE_RATE
                and self._vad_samples - heard >= AHEAD_MIN_SILENCE * SAMPLE_RATE)

    def _speech_starts(self, sample: int) -> None:
        self._note_silence(sample)
        self._speech_seen = True
        self._in_speech = True
        self._starts.append(sample / SAMPLE_RATE)
        self.policy.start(sample / SAMPLE_RATE)
        self._fed_until = sample

    def _check_ending(self) -> Steps:
        """The ending of the utterance that ended last, if not checked yet (the policy's `ending_steps`:
        a free decode of its audio, the words it hears after the last one committed), and then its end
        told. When the check did not run beside the utterance's last decode (`_finish_utterance`), it
        runs a step after the utterance's end, so the words before it are shown without waiting for it;
        nothing is committed or noted as silence after that utterance until it has run."""
        if self.ending_pending:
            self._commit((yield from self.policy.ending_steps()))
            self._attribute()
        if self._closing is not None:
            self._ends.append(self._closing)
            self._closing = None

    def _finish_utterance(self) -> Steps:
        """The utterance's last words; its ending too when the policy checked it beside its last decode
        (`TranscribeTogether`), else that check runs a step later (`_check_ending`)."""
        self._commit((yield from self.policy.finish_steps()))
        if self.policy.ending_decoded:
            yield from self._check_ending()

    def _ended(self, t: float) -> None:
        """The utterance under way ended at stream time `t`. Its end is told (`CaptionState.speech_ends`,
        the turn ends of the vendor protocols) with its last words: at once, or after its ending check."""
        if self.ending_pending:
            self._closing = t
        else:
            self._ends.append(t)

    def _commit(self, words: list) -> None:
        """Committed words go to the transcript, through attribution when there is a diarizer.
        (The policy has already dropped runs that repeat what was just committed, `_once`.)"""
        if self.attribution is None:
            self.transcript.add_words(words)
        else:
            self.attribution.add_words(words)

    def _attribute(self, everything: bool = False) -> None:
        if self.attribution is not None:
            for item, speaker, span in self.attribution.take_ready(everything):
                if speaker == SILENCE_SPEAKER:
                    self.transcript.add_silence(item.start, item.end)
                else:
                    self.transcript.add_words([item], speaker, span)
            reach = self.attribution.reach_of_last()
            if reach is not None and not self.attribution.waiting:
                self.transcript.reach(reach)

    def _speech_ends(self, sample: int) -> Steps:
        """The VAD's end of speech at `sample`. The policy may already hold the pause after it
        (shorter pauses stay inside an utterance); the silence is counted from `sample` all the same."""
        yield from self._check_ending()  # two utterances ended in one step: the first one's ending first
        self._feed_policy(sample)
        self.policy.end_at(sample / SAMPLE_RATE)
        yield from self._finish_utterance()
        self._tentative = []
        self._in_speech = False
        self._ended(sample / SAMPLE_RATE)
        self._speech_end = sample
        self._fed_end = max(sample, self._fed_until)

    def _feed_policy(self, until: int) -> None:
        a = self._fed_until - self._recent_start
        b = until - self._recent_start
        if b > a:
            self.policy.insert_audio(self._recent[a:b])
            self._fed_until = until

    def _note_silence(self, now: int) -> None:
        """A silence as long as `--silence-line-seconds` becomes (or extends) a silence line (not before
        the ending of the speech before it is checked: its words come first)."""
        if (self._in_speech or self.ending_pending
                or (now - self._speech_end) / SAMPLE_RATE < self.options.silence_line_seconds):
            return
        start, end = self._speech_end / SAMPLE_RATE, now / SAMPLE_RATE
        if self.attribution is not None and self.attribution.waiting:
            self.attribution.add_silence(start, end)  # words spoken before it reach the transcript first
        else:
            self.transcript.add_silence(start, end)

    def _forget_old_audio(self) -> None:
        keep_from = self._fed_until if self._in_speech else self._vad_samples - SAMPLE_RATE
        drop = max(0, keep_from - self._recent_start)
        if drop:
            self._recent = self._recent[drop:]
            self._recent_start += drop
