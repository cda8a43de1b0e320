"""`--diarization` on a fresh machine (no Sortformer checkpoint → the offline embedding diarizer):
a two-person conversation at real-time pace comes back as alternating speakers with the right words."""
from __future__ import annotations

import logging

import pytest

from bench.metrics import wer
from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.live import serve_app
from tests.test_e2e_speech import stream_realtime
from tests.voices import CONVERSATION, make_conversation, to_pcm16

pytestmark = pytest.mark.slow


def test_two_people_two_speakers_right_turns(tmp_path, caplog):
    audio, truth = make_conversation(tmp_path)
    caplog.set_level(logging.INFO, logger="streamserver.engine.models")
    app = create_app(ServerConfig(cache_dir=str(tmp_path / "cache"), diarization=True))
    assert "using the embedding diarizer" in caplog.text
    with serve_app(app) as base:
        messages = stream_realtime(base, "pcm", to_pcm16(audio), len(audio) / 16000)
    final = [m for m in messages if "lines" in m][-1]
    speech = [ln for ln in final["lines"] if ln["speaker"] != -2]
    assert [ln["speaker"] for ln in speech] == [1, 2, 1, 2], speech
    for line, (voice, text), (start, end, _) in zip(speech, CONVERSATION, truth):
        assert wer(text, line["text"]) <= 0.5, (line["text"], text)  # each turn's words are on its line
        assert abs(line["start_s"] - start) < 0.6
    said = " ".join(text for _, text in CONVERSATION)
    assert wer(said, " ".join(ln["text"] for ln in speech)) <= 0.25
    assert final["buffer_diarization"] == ""
