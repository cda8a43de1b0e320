"""With a diarizer, lines carry speakers and break where the speaker changes; words wait in
`buffer_diarization` until the diarizer has covered them. (Fake models: the real ones have
their own tests.)"""
from __future__ import annotations

import numpy as np

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader_with_diarizer
from tests.live import drain_until_closed, open_asr, recv_json, serve_app


def tone(seconds: float, amplitude: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (amplitude * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()


def test_speakers_and_the_diarization_buffer():
    app = create_app(ServerConfig(simulate_gpus="1x16", diarization=True), loader=fake_loader_with_diarizer)
    with serve_app(app) as base:
        ws = open_asr(base, "format=pcm")
        assert recv_json(ws)["diarization"] is True
        audio = tone(3.0, 0.5) + tone(3.0, 0.05)  # "speaker" loud, then quiet, no pause
        for i in range(0, len(audio), 3200):
            ws.send(audio[i:i + 3200])
        ws.send(b"")
        messages = drain_until_closed(ws)
    updates = [m for m in messages if "lines" in m]
    final = updates[-1]
    speakers = [ln["speaker"] for ln in final["lines"]]
    assert speakers == [1, 2], final["lines"]
    assert final["lines"][0]["text"].startswith("w0") and final["buffer_diarization"] == ""
    assert final["remaining_time_diarization"] == 0.0
    # committed lines only ever grow, even as speakers arrive
    for before, after in zip(updates, updates[1:]):
        assert after["lines"][: max(0, len(before["lines"]) - 1)] == before["lines"][:-1]


def test_a_silence_line_never_jumps_ahead_of_words_waiting_for_their_speaker():
    app = create_app(ServerConfig(simulate_gpus="1x16", diarization=True), loader=fake_loader_with_diarizer)
    with serve_app(app) as base:
        ws = open_asr(base, "format=pcm")
        recv_json(ws)
        audio = tone(3.0, 0.5) + tone(3.0, 0.001) + tone(3.0, 0.05)  # loud, a pause (faint noise), quiet
        for i in range(0, len(audio), 3200):
            ws.send(audio[i:i + 3200])
        ws.send(b"")
        final = [m for m in drain_until_closed(ws) if "lines" in m][-1]
    assert [ln["speaker"] for ln in final["lines"]] == [1, -2, 2], final["lines"]
    starts = [ln["start_s"] for ln in final["lines"]]
    assert starts == sorted(starts)
