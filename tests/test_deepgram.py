"""Deepgram's streaming API at `/v1/listen` over real sockets, with stand-in models: the events and their
order, Finalize and CloseStream, the encodings, and each refusal in Deepgram's own shape."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader, tone
from tests.live import serve_app

LISTEN = "/v1/listen?encoding=linear16&sample_rate=16000&channels=1"


@pytest.fixture
def base():
    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=1, api_token="secret"),
                     loader=fake_loader)
    with serve_app(app) as url:
        yield url


def _open(base: str, query: str = LISTEN, token: str = "secret"):
    return connect(f"ws://{base}{query}", additional_headers={"Authorization": f"Token {token}"}, open_timeout=30)


def _send(ws, pcm: bytes, pace: float = 5.0) -> None:
    for i in range(0, len(pcm), 3200):
        ws.send(pcm[i:i + 3200])
        time.sleep(0.1 / pace)


def _all(ws) -> tuple[list[dict], int]:
    """Every message until the server closes, and the close code."""
    out = []
    try:
        while True:
            out.append(json.loads(ws.recv(timeout=30)))
    except ConnectionClosed as closed:
        return out, closed.rcvd.code


def _speech() -> bytes:
    return tone(3.0) + tone(2.5, amplitude=0.002) + tone(3.0)


def test_results_speech_events_utterance_ends_and_metadata_come_in_deepgram_order(base):
    query = LISTEN + "&interim_results=true&vad_events=true&utterance_end_ms=1000&punctuate=true"
    with _open(base, query) as ws:
        _send(ws, _speech())
        ws.send(json.dumps({"type": "KeepAlive"}))
        ws.send(json.dumps({"type": "CloseStream"}))
        events, code = _all(ws)
    assert code == 1000
    kinds = [e["type"] for e in events]
    assert kinds[0] == "SpeechStarted" and kinds[-1] == "Metadata" and kinds.count("SpeechStarted") == 2
    assert "UtteranceEnd" in kinds and kinds.index("UtteranceEnd") < kinds.index("SpeechStarted", 1)
    finals = [e for e in events if e["type"] == "Results" and e["is_final"]]
    interims = [e for e in events if e["type"] == "Results" and not e["is_final"]]
    assert interims and all(not e["speech_final"] for e in interims)
    words = [w for e in finals for w in e["channel"]["alternatives"][0]["words"]]
    assert len(words) >= 4 and [w["start"] for w in words] == sorted(w["start"] for w in words)
    assert {"word", "start", "end", "confidence", "punctuated_word"} <= set(words[0])
    assert any(e["speech_final"] for e in finals)
    first = finals[0]
    assert first["channel_index"] == [0, 1] and first["metadata"]["request_id"]
    meta = events[-1]
    assert meta["duration"] == pytest.approx(8.5, abs=0.01) and meta["channels"] == 1 and len(meta["sha256"]) == 64


def test_finalize_commits_what_was_said_and_marks_it_from_finalize(base):
    with _open(base) as ws:
        _send(ws, tone(3.0))
        ws.send(json.dumps({"type": "Finalize"}))
        got = []
        while not any(e.get("from_finalize") for e in got):
            got.append(json.loads(ws.recv(timeout=30)))
        ws.send(json.dumps({"type": "CloseStream"}))
        _all(ws)
    marked = [e for e in got if e.get("from_finalize")]
    assert marked[0]["is_final"] and marked[0]["channel"]["alternatives"][0]["transcript"]


def test_audio_after_finalize_goes_on_being_transcribed(base):
    """Finalize mid-stream (LiveKit's and Pipecat's end of turn), then more audio, here at 24 kHz (resampled)."""
    t = np.arange(24000 * 2) / 24000
    pcm = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()
    with _open(base, "/v1/listen?encoding=linear16&sample_rate=24000") as ws:
        got = []
        for turn in (1, 2):
            for i in range(0, len(pcm), 960):
                ws.send(pcm[i:i + 960])
                time.sleep(0.01)
            ws.send(json.dumps({"type": "Finalize"}))
            while sum(bool(e.get("from_finalize")) for e in got) < turn:
                got.append(json.loads(ws.recv(timeout=30)))
        ws.send(json.dumps({"type": "CloseStream"}))
        events, code = _all(ws)
    assert code == 1000 and events[-1]["type"] == "Metadata"
    marked = [e for e in got if e.get("from_finalize")]
    assert len(marked) == 2 and all(e["channel"]["alternatives"][0]["transcript"] for e in marked)


def test_mulaw_at_8_khz_in_stereo_is_heard(base):
    from streamserver.audio import raw

    t = np.arange(8000 * 3) / 8000
    lin = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    table = raw._mulaw_table()
    mulaw = np.abs(table[None, :].astype(np.int32) - lin[:, None]).argmin(axis=1).astype(np.uint8)
    stereo = np.repeat(mulaw, 2).tobytes()
    with _open(base, "/v1/listen?encoding=mulaw&sample_rate=8000&channels=2") as ws:
        for i in range(0, len(stereo), 1600):
            ws.send(stereo[i:i + 1600])
            time.sleep(0.02)
        ws.send(json.dumps({"type": "CloseStream"}))
        events, _ = _all(ws)
    words = [w for e in events if e["type"] == "Results" for w in e["channel"]["alternatives"][0]["words"]]
    assert len(words) >= 2 and events[-1]["duration"] == pytest.approx(3.0, abs=0.05)


def test_refusals_are_deepgrams_http_errors_before_the_upgrade(base):
    with pytest.raises(InvalidStatus) as bad_token:
        _open(base, token="wrong")
    assert bad_token.value.response.status_code == 401
    assert json.loads(bad_token.value.response.body)["err_code"] == "INVALID_AUTH"
    with pytest.raises(InvalidStatus) as bad_encoding:
        _open(base, "/v1/listen?encoding=speex")
    assert bad_encoding.value.response.status_code == 400
    with _open(base) as held:  # the one slot
        with pytest.raises(InvalidStatus) as full:
            _open(base)
        held.send(json.dumps({"type": "CloseStream"}))
        _all(held)
    assert full.value.response.status_code == 429
    assert json.loads(full.value.response.body)["err_code"] == "TOO_MANY_REQUESTS"


def test_bad_control_messages_and_bad_audio_close_with_data_0000(base):
    with _open(base) as ws:
        ws.send("not json")
        _, code = _all(ws)
    assert code == 1008
    with _open(base, "/v1/listen") as ws:  # no encoding: a container is expected
        ws.send(b"this is not webm or ogg")
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "DATA-0000")


def test_two_utterances_told_ended_in_one_update_are_two_turns_in_the_order_they_were_said():
    """A busy device can tell two utterances' ends in one update: each gets its own speech_final Results
    with its own words (LiveKit ends a turn at each), and the second's SpeechStarted comes after the
    first's turn ended."""
    from types import SimpleNamespace

    from streamserver.live.captions import CaptionState, SpokenWord
    from streamserver.live.stream import StreamUpdate
    from streamserver.protocols.deepgram import DeepgramAdapter, ListenOptions

    options = ListenOptions({"vad_events": "true", "punctuate": "true"})
    adapter = DeepgramAdapter(SimpleNamespace(id="r"), options, decoder=None, max_frame=1 << 20, model="nova-3")
    words = (SpokenWord("One", 0.5, 0.8), SpokenWord("two.", 0.9, 1.2), SpokenWord("Three", 3.0, 3.3),
             SpokenWord("four.", 3.4, 3.7), SpokenWord("Five", 6.0, 6.2))
    state = CaptionState(words=words, speech_starts=(0.4, 2.9, 5.9), speech_ends=(1.4, 3.9))
    events = adapter.render(StreamUpdate(state, 6.5, False, False))
    kinds = [(e["type"], e.get("speech_final")) for e in events]
    assert kinds == [("SpeechStarted", None), ("Results", True), ("SpeechStarted", None), ("Results", True),
                     ("SpeechStarted", None), ("Results", False)], kinds
    texts = [e["channel"]["alternatives"][0]["transcript"] for e in events if e["type"] == "Results"]
    assert texts == ["One two.", "Three four.", "Five"]


def _silence(seconds: float) -> bytes:
    return bytes(2 * int(seconds * 16000))


def _turns(base: str, query: str, pause: float) -> list[dict]:
    """Two utterances with `pause` seconds between, at 5x real time, then CloseStream: every message."""
    with _open(base, LISTEN + query) as ws:
        _send(ws, tone(2.0) + _silence(pause) + tone(2.0) + _silence(0.3))
        ws.send(json.dumps({"type": "CloseStream"}))
        events, code = _all(ws)
    assert code == 1000
    return events


@pytest.mark.parametrize("endpointing, pause, ends", [
    (None, 0.2, True),  # Deepgram's default, 10 ms: the shortest pause the VAD hears ends the utterance
    ("25", 0.2, True),  # LiveKit's: 25 ms as sent (it was raised to 300)
    ("500", 0.8, True),
    ("1500", 0.8, False),  # a pause shorter than the endpointing is inside the utterance
])
def test_endpointing_is_the_pause_in_milliseconds_as_sent(base, endpointing, pause, ends):
    events = _turns(base, "&vad_events=true" + (f"&endpointing={endpointing}" if endpointing else ""), pause)
    second = [i for i, e in enumerate(events) if e["type"] == "SpeechStarted"][1 if ends else 0]
    before = [e for e in events[:second] if e["type"] == "Results" and e["speech_final"]] if ends else [
        e for e in events if e["type"] == "Results" and e["speech_final"]][:-1]
    if ends:  # the first utterance ended in the pause: its words, marked speech_final, before the next one
        assert before and before[-1]["channel"]["alternatives"][0]["transcript"]
    else:  # one utterance: speech_final only at the stream's end
        assert before == [] and sum(e["type"] == "SpeechStarted" for e in events) == 1


def test_endpointing_false_sends_no_speech_final_and_utterance_end_marks_the_gap(base):
    events = _turns(base, "&endpointing=false&interim_results=true&utterance_end_ms=1000", 2.5)
    finals = [e for e in events if e["type"] == "Results" and e["is_final"]]
    assert len([e for e in finals if e["channel"]["alternatives"][0]["words"]]) >= 2  # both utterances' words
    assert not any(e["speech_final"] for e in events if e["type"] == "Results")
    kinds = [e["type"] for e in events]
    assert kinds.count("UtteranceEnd") == 1  # after the first utterance's words (the second ends the stream)
    end = kinds.index("UtteranceEnd")
    first_words = [w for e in finals[:2] for w in e["channel"]["alternatives"][0]["words"] if w["end"] <= 2.2]
    assert first_words and events[end]["last_word_end"] == pytest.approx(first_words[-1]["end"], abs=0.01)
    assert all(w["start"] >= 2.0 for e in events[end:] if e["type"] == "Results" and e["is_final"]
               for w in e["channel"]["alternatives"][0]["words"])


def test_endpointing_must_be_milliseconds_or_false(base):
    with pytest.raises(InvalidStatus) as bad:
        _open(base, LISTEN + "&endpointing=soon")
    assert bad.value.response.status_code == 400
