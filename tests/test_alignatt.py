"""AlignAtt with a scripted ASR: what is committed each update, what is held back, how the buffer is cut;
and with real tiny.en weights through a session."""
from __future__ import annotations

import math

import numpy as np

from backends.asr_types import Segment, TranscribeJob, Word, drive
from bench.metrics import wer
from streamserver.live.alignatt import END_GUARD, AlignAttPolicy

WORD = 0.5  # one scripted word every half second of audio


class HeardASR:
    """Honours prefix and stop_before_end the way the engine does: words of the whole stream laid out
    every 0.5 s (a comma after every fourth), the prefix's words skipped, decoding stopped at the first
    word whose attention (its middle) falls within `stop_before_end` of the audio's end."""

    def __init__(self) -> None:
        self.jobs: list[TranscribeJob] = []
        self.offset = 0.0

    def __call__(self, job: TranscribeJob) -> list[Segment]:
        self.jobs.append(job)
        seconds = min(len(job.audio) / 16000, 30.0)  # the engine hears one 30-s window
        skip = len(job.prefix.split())
        out, k = [], 0
        n = math.ceil(self.offset / WORD - 1e-6)  # the first word that starts inside the buffer
        while True:
            start = n * WORD - self.offset
            end = start + 0.45
            if end > seconds + 1e-9 or (job.stop_before_end is not None and start + 0.22 >= seconds - job.stop_before_end):
                break
            if k >= skip:
                out.append(Word(start, end, f" w{n}" + ("," if n % 4 == 3 else "")))
            n, k = n + 1, k + 1
        return [Segment(out[0].start, out[-1].end, tuple(out))] if out else []


def _run(seconds: float, trim: float = 15.0):
    asr = HeardASR()
    policy = AlignAttPolicy(frame_threshold=0.5, trim_seconds=trim)
    committed, tentative_seen = [], []
    for i in range(int(seconds)):
        policy.insert_audio(np.zeros(16000, np.float32))
        asr.offset = policy.offset
        out = drive(policy.process_steps(), asr)
        committed += out.committed
        tentative_seen.append([w.text for w in out.tentative])
    asr.offset = policy.offset
    committed += drive(policy.finish_all_steps(), asr)
    return committed, tentative_seen, asr, policy


def test_each_update_commits_the_new_words_heard_and_decodes_only_those():
    committed, tentative, asr, _ = _run(6)
    texts = [w.text.strip(",").strip() for w in committed]
    assert texts == [f"w{i}" for i in range(12)]  # every word once, in order
    assert all(a.start <= b.start for a, b in zip(committed, committed[1:]))
    # after the first update the prefix is what was committed: nothing is decoded twice
    assert asr.jobs[1].prefix.split() == [w.text.strip() for w in committed[: len(asr.jobs[1].prefix.split())]]
    assert all(job.stop_before_end == 0.5 for job in asr.jobs[:-2]) and asr.jobs[-2].stop_before_end == END_GUARD
    assert not asr.jobs[-1].prefix and asr.jobs[-1].stop_before_end is None  # the ending checked: a free decode
    assert any(tentative)  # the word at the edge of the audio is shown, not committed


def test_a_stream_that_fell_behind_loses_no_words_past_whisper_s_30_second_window():
    """40 s arrive before the policy decodes (a loaded server), then the stream ends: every word is
    committed once, in order, and no decode is given more than one window."""
    asr = HeardASR()
    policy = AlignAttPolicy(frame_threshold=0.5)
    policy.insert_audio(np.zeros(40 * 16000, np.float32))

    def answer(job):
        asr.offset = policy.offset
        return asr(job)

    committed = drive(policy.finish_all_steps(), answer)
    assert [w.text.strip(",").strip() for w in committed] == [f"w{i}" for i in range(80)]
    assert max(len(job.audio) for job in asr.jobs) / 16000 <= 29.0


def test_a_long_buffer_is_cut_at_a_committed_clause_end_and_its_text_becomes_the_prompt():
    committed, _, asr, policy = _run(20, trim=4.0)
    assert [w.text.strip(",").strip() for w in committed] == [f"w{i}" for i in range(40)]
    longest = max(len(job.audio) for job in asr.jobs) / 16000
    assert longest <= 4.0 + 2.0 + 1e-6  # never far past the trim length
    assert any(job.prompt for job in asr.jobs)


def test_real_speech_streamed_through_alignatt_comes_back_right(speech_audio, speech_text, tiny_en_checkpoint):
    from gpu_manager import Device
    from streamserver.config import ServerConfig
    from streamserver.engine.models import make_loader
    from streamserver.live.session import AudioInbox, Session, SessionOptions, answer_directly

    models = make_loader(ServerConfig(model=str(tiny_en_checkpoint)))(Device(0, "cpu", 0, "cpu"))
    inbox = AudioInbox()
    session = Session(inbox, models, SessionOptions(policy="alignatt", language="en"))
    for off in range(0, len(speech_audio), 1600):
        inbox.put(speech_audio[off:off + 1600])
        drive(session.step(), answer_directly(models))
    state = drive(session.finish(), answer_directly(models))
    text = " ".join(line.text for line in state.lines if line.speaker != -2)
    assert wer(speech_text, text) <= 0.15, text
    starts = [line.start for line in state.lines]
    assert starts == sorted(starts)


class RevisingASR:
    """The first decode of an utterance mishears its first word ("I'd less"); with a second more
    audio Whisper hears it right ("unless"). Words are every 0.5 s, as in `HeardASR`."""

    TRUTH = ["unless", "to", "be", "rather", "cold", "hearted", "and", "rather", "selfish"]

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, job: TranscribeJob) -> list[Segment]:
        self.calls += 1
        seconds = len(job.audio) / 16000
        said = list(self.TRUTH)
        if self.calls == 1:
            said[0] = "I'd-less"
        out = []
        for n, text in enumerate(said):
            start = n * WORD
            if n < len(job.prefix.split()):
                continue
            if start + 0.45 > seconds or (job.stop_before_end is not None
                                          and start + 0.22 >= seconds - job.stop_before_end):
                break
            out.append(Word(start, start + 0.45, " " + text))
        return [Segment(out[0].start, out[-1].end, tuple(out))] if out else []


def test_a_word_is_committed_only_once_a_second_decode_says_it_again():
    asr = RevisingASR()
    policy = AlignAttPolicy(frame_threshold=0.5)
    committed, shown = [], []
    for seconds in (2, 1, 1, 1):
        policy.insert_audio(np.zeros(16000 * seconds, np.float32))
        out = drive(policy.process_steps(), asr)
        committed += out.committed
        shown.append([w.text.strip() for w in out.tentative])
    committed += drive(policy.finish_all_steps(), asr)
    assert "I'd-less" in shown[0]  # the first guess is shown while it is unsure
    assert [w.text.strip() for w in committed] == RevisingASR.TRUTH  # but never committed
