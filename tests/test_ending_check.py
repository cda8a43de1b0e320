"""An utterance's ending, checked by a free decode after its words are shown (`Session`, `UtteranceBuffer.ending_steps`).

The ASR stands in for Whisper conditioned on committed text: prompted, it stops a word short of
the audio's end; free (no prompt, no prefix), it says every word. Three utterances with pauses
between them go through a session in quarter-second steps.
"""
from __future__ import annotations

from itertools import pairwise

import numpy as np

from backends.asr_types import DecodeNow, Segment, TranscribeJob, TranscribeTogether, drive
from gpu_manager import Device
from streamserver.live.session import (
    AudioInbox,
    Session,
    SessionOptions,
    answer_directly,
)
from backends.vad import VadJob
from tests.fakes import EchoASR, fake_loader


class StopsShortWhenPrompted(EchoASR):
    def __init__(self) -> None:
        self.free_jobs = 0

    def transcribe(self, audio: np.ndarray, prompt: str = "", language: str | None = None) -> list[Segment]:
        """`EchoASR`'s words, but only for seconds that are mostly speech: like Whisper, nothing is said
        for the pause the buffer holds until the VAD ends the utterance, whenever the decode runs."""
        segments = super().transcribe(audio, prompt, language)
        speech = [bool(np.mean(np.abs(audio[i * 16000:(i + 1) * 16000]) > 0.01) >= 0.5)
                  for i in range(len(audio) // 16000)]
        words = tuple(w for s in segments for w in s.words if speech[int(w.start)])
        return [Segment(0.0, float(len(audio) // 16000), words)] if words else []

    def transcribe_batch(self, jobs: list[TranscribeJob]):
        out = []
        for job in jobs:
            segments = self.transcribe(job.audio)
            if job.prompt or job.prefix:
                segments = [type(s)(s.start, s.end, s.words[:-1]) for s in segments if len(s.words) > 1]
            else:
                self.free_jobs += 1
            out.append(segments)
        return out


def _speech(seconds: float, amplitude: float = 0.3) -> np.ndarray:
    """Loud: `EchoASR` says w0, w1, ...; quiet (0.1): q0, q1, ... (so no utterance repeats the one before)."""
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 300 * t)).astype(np.float32)


def test_each_utterance_keeps_the_last_word_a_prompted_decode_stopped_short_of_and_nothing_goes_back():
    models = fake_loader(Device(0, "cpu", 0, "cpu"))
    models.asr = StopsShortWhenPrompted()
    answer = answer_directly(models)
    session = Session(AudioInbox(), models, SessionOptions(utterance_pause_seconds=1.0, silence_line_seconds=1.0))
    pause = np.zeros(int(2.5 * 16000), np.float32)
    audio = np.concatenate([_speech(4.0), pause, _speech(4.0, 0.1), pause, _speech(3.0), pause])
    shown: list[str] = []
    for at in range(0, len(audio), 4000):
        session.inbox.put(audio[at:at + 4000])
        state = drive(session.step(), answer)
        shown.append(" ".join(w.text for w in state.words))
    state = drive(session.finish(), answer)
    shown.append(" ".join(w.text for w in state.words))

    words = [w.text.strip() for w in state.words]
    # The first utterance is decoded with no prompt (nothing committed before it); the second and
    # third are prompted, stop a word short, and the check after each brings its last word back.
    assert words == ["w0", "w1", "w2", "w3", "q0", "q1", "q2", "q3", "w0", "w1", "w2"], words
    assert models.asr.free_jobs >= 2
    # The words were shown before their ending was checked (the last word the prompted decode said,
    # "q2", either with them, committed after it waited `MAX_PENDING_SECONDS` while the pause was
    # heard, or held and shown with the ending).
    assert any("q1" in text.split() and "q3" not in text.split() for text in shown)
    assert all(b.startswith(a) for a, b in pairwise(shown))  # committed text only grows
    starts = [w.start for w in state.words]
    assert starts == sorted(starts)
    lines = [(ln.start, ln.end) for ln in state.lines]
    assert [s for s, _ in lines] == sorted(s for s, _ in lines)  # no silence line before the words it follows


def test_an_utterance_end_is_told_with_every_word_of_it_and_its_check_beside_its_last_decode():
    """Voice agents end a turn at the utterance's end (Deepgram's speech_final, OpenAI's completed): the
    state that first tells an end already holds every word before it. The last decode of an utterance
    and the free decode that checks it hear the same audio: they go to the engine together, in the
    same step, not a step apart."""
    models = fake_loader(Device(0, "cpu", 0, "cpu"))
    models.asr = StopsShortWhenPrompted()
    base = answer_directly(models)
    together = []

    def answer(job):
        together.append(isinstance(job, TranscribeTogether))
        return base(job)

    answer.together = True
    # A short endpointing pause, as voice agents ask for: the VAD ends each utterance before a decode heard
    # its last half second.
    session = Session(AudioInbox(), models, SessionOptions(utterance_pause_seconds=0.5, silence_line_seconds=1.0))
    pause = np.zeros(int(2.5 * 16000), np.float32)
    audio = np.concatenate([_speech(3.5), pause, _speech(3.5, 0.1), pause, _speech(3.5), pause])
    told: list[tuple[float, list[str]]] = []  # (an end, the words shown when it was first told)
    for at in range(0, len(audio), 4000):
        session.inbox.put(audio[at:at + 4000])
        state = drive(session.step(), answer)
        for end in state.speech_ends[len(told):]:
            told.append((end, [w.text.strip() for w in state.words]))
    state = drive(session.finish(), answer)
    assert len(told) == 3
    for end, words in told:
        before = [w.text.strip() for w in state.words if w.start < end]
        assert words[:len(before)] == before, (end, words, before)
    assert any(together)  # the prompted utterances' last decodes were paired with their checks


def test_a_pause_that_ends_the_utterance_has_its_last_decode_run_while_it_is_heard(monkeypatch):
    """The last decode of an utterance (and its ending check) runs while the pause that ends it is still
    being heard (`decode_ahead_steps`): the step in which the VAD ends the utterance tells its end with
    no decode left to wait for, and the words are those of the decode run at the end."""
    import streamserver.live.session as session_module

    def run(ahead: float):
        monkeypatch.setattr(session_module, "AHEAD_SECONDS", ahead)
        models = fake_loader(Device(0, "cpu", 0, "cpu"))
        models.asr = StopsShortWhenPrompted()
        base = answer_directly(models)
        jobs = [0]

        def answer(job):
            jobs[0] += not isinstance(job, (VadJob, DecodeNow))
            return base(job)

        answer.together = True
        session = Session(AudioInbox(), models, SessionOptions(utterance_pause_seconds=0.5, silence_line_seconds=1.0))
        pause = np.zeros(int(2.5 * 16000), np.float32)
        audio = np.concatenate([_speech(3.5), pause, _speech(3.5, 0.1), pause, _speech(3.5), pause])
        waited = []  # model calls in each step that first told an utterance's end
        ends = 0
        for at in range(0, len(audio), 1600):
            session.inbox.put(audio[at:at + 1600])
            jobs[0] = 0
            state = drive(session.step(), answer)
            if len(state.speech_ends) > ends:
                waited.append(jobs[0])
                ends = len(state.speech_ends)
        return [w.text.strip() for w in drive(session.finish(), answer).words], waited

    default = session_module.AHEAD_SECONDS
    at_the_end, waited_at_the_end = run(0.0)
    ahead, waited_ahead = run(default)
    assert ahead == at_the_end
    assert len(waited_ahead) == 3 and waited_ahead[1:] == [0, 0], waited_ahead  # the prompted utterances
    assert any(waited_at_the_end), waited_at_the_end
