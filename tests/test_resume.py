"""Resumable `/asr` sessions over real sockets: a client whose TCP connection drops comes back with its
token to the same stream (slot, lines, received bytes) and sends only what was lost."""
from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader, tone
from tests.live import gpu_status, recv_json, serve_app, wait_for

FRAME = 3200  # 0.1 s of 16 kHz s16le


@pytest.fixture
def base():
    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=2, pcm_input=True,
                                  resume_seconds=30), loader=fake_loader)
    with serve_app(app) as url:
        yield url


def _open(base: str, query: str = ""):
    return connect(f"ws://{base}/asr{query}", max_size=None, open_timeout=30)


def _drop(ws) -> None:
    """The network goes: no close frame, the TCP connection just ends."""
    ws.socket.shutdown(socket.SHUT_RDWR)
    ws.socket.close()


def _send(ws, pcm: bytes, pace: float = 5.0) -> None:
    """At `pace` times real time, as a live client (each frame gets its own steps)."""
    for i in range(0, len(pcm), FRAME):
        ws.send(pcm[i:i + FRAME])
        time.sleep(0.1 / pace)


def _until_heard(ws, seconds: float) -> dict:
    """Updates until one has lines reaching `seconds` into the stream."""
    while True:
        msg = recv_json(ws)
        if msg.get("lines") and msg["lines"][-1]["end_s"] >= seconds:
            return msg


def _settle(ws, seconds: float = 1.0) -> None:
    """Read what the server says for `seconds` (it has taken in what was sent)."""
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        try:
            ws.recv(timeout=left)
        except TimeoutError:
            return


def _finish(ws) -> dict:
    ws.send(b"")
    last = None
    while True:
        msg = recv_json(ws)
        if msg.get("type") == "ready_to_stop":
            return last
        last = msg


def _words(update: dict) -> list[str]:
    return " ".join(line["text"] for line in update["lines"] if line["speaker"] > 0).split()


def _audio() -> bytes:
    pause = tone(2.5, amplitude=0.002)  # silence to the VAD, nothing to the ASR: an utterance ends
    return tone(4.0) + pause + tone(4.0, amplitude=0.05) + pause + tone(3.0)


def test_a_dropped_client_resumes_its_stream_and_the_transcript_is_the_uninterrupted_one(base):
    pcm = _audio()
    with _open(base) as ws:  # the same audio, never interrupted
        recv_json(ws)
        _send(ws, pcm)
        whole = _finish(ws)

    ws = _open(base)
    config = recv_json(ws)
    token = config["resume_token"]
    cut = 8 * 32000  # 8 s in
    _send(ws, pcm[:cut])
    before = _until_heard(ws, 5.0)
    _drop(ws)
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
    assert gpu_status(base)["active_connections"] == 0  # held for the client, not a live connection

    with _open(base, f"?resume={token}") as again:
        resumed = recv_json(again)
        assert resumed["type"] == "config" and resumed["resumed"] is True
        # what reached the server before the drop (frames in flight when it dropped may be lost)
        assert 5 * 32000 <= resumed["received_bytes"] <= cut and resumed["received_bytes"] % 2 == 0
        assert resumed["connection_id"] == config["connection_id"]
        assert resumed["resume_token"] != token  # a token works once
        state = recv_json(again)  # the current full state comes first
        assert state["lines"][:len(before["lines"]) - 1] == before["lines"][:-1]  # committed lines kept
        _send(again, pcm[resumed["received_bytes"]:])
        final = _finish(again)
    assert _words(final) == _words(whole)
    wait_for(lambda: gpu_status(base)["active_connections"] == 0 and gpu_status(base)["held_for_resume"] == 0)


def test_a_second_drop_resumes_too_and_a_used_token_opens_nothing(base):
    pcm = _audio()
    ws = _open(base)
    first = recv_json(ws)["resume_token"]
    _send(ws, pcm[:4 * 32000])
    _settle(ws)
    _drop(ws)
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
    ws = _open(base, f"?resume={first}")
    second = recv_json(ws)
    _send(ws, pcm[second["received_bytes"]:9 * 32000])
    _settle(ws)
    _drop(ws)
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
    with _open(base, f"?resume={first}") as stale:  # the first token was spent
        with pytest.raises(ConnectionClosed) as closed:
            stale.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "Unknown or expired session")
    with _open(base, f"?resume={second['resume_token']}") as ws:
        third = recv_json(ws)
        assert third["resumed"] is True and 6 * 32000 <= third["received_bytes"] <= 9 * 32000
        recv_json(ws)
        _send(ws, pcm[third["received_bytes"]:])
        final = _finish(ws)
    assert len(_words(final)) >= 10


def test_an_unknown_token_is_refused_and_takes_no_slot(base):
    with _open(base, "?resume=not-a-token") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "Unknown or expired session")
    assert gpu_status(base)["active_connections"] == 0


def test_a_client_that_does_not_come_back_in_time_loses_its_slot_and_its_token():
    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True, resume_seconds=1), loader=fake_loader)
    with serve_app(app) as base:
        ws = _open(base)
        token = recv_json(ws)["resume_token"]
        _send(ws, tone(2.0))
        _drop(ws)
        wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
        wait_for(lambda: gpu_status(base)["active_connections"] == 0 and gpu_status(base)["held_for_resume"] == 0, timeout=5)
        with _open(base, f"?resume={token}") as late:
            with pytest.raises(ConnectionClosed) as closed:
                late.recv(timeout=10)
        assert closed.value.rcvd.code == 1008


def test_a_client_that_closes_the_socket_itself_is_not_waited_for(base):
    ws = _open(base)
    recv_json(ws)
    _send(ws, tone(2.0))
    ws.close()  # a close frame: the client meant to go
    wait_for(lambda: gpu_status(base)["active_connections"] == 0)
    assert gpu_status(base)["held_for_resume"] == 0


def test_without_resume_seconds_there_is_no_token():
    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True, resume_seconds=0), loader=fake_loader)
    with serve_app(app) as base, _open(base) as ws:
        assert "resume_token" not in json.loads(ws.recv(timeout=10))


@pytest.mark.slow
def test_a_real_two_person_recording_resumed_mid_way_keeps_its_words_and_speakers(tiny_en_checkpoint, tmp_path):
    """The father-child recording (18 s) with the real tiny.en and the embedding diarizer: dropped at
    9 s and resumed, its final captions are as right as the uninterrupted stream's (two live runs
    never chunk the audio alike, so their words may differ where tiny.en hesitates), with nothing
    said twice or lost across the drop, and the same two speakers."""
    from bench.speech_set import DEFAULT_SET, load_diarized, lost_ending, new_repeats, wer

    if not (DEFAULT_SET / "manifest.tsv").exists():
        pytest.skip(f"the real-speech set is not at {DEFAULT_SET}")
    [clip] = load_diarized(DEFAULT_SET, ["conversational_childes_father_child"])
    pcm = clip.pcm16()
    config = ServerConfig(model=str(tiny_en_checkpoint), pcm_input=True, idle_unload_seconds=0, diarization=True,
                          diarization_backend="embedding", resume_seconds=30, jobs_db=str(tmp_path / "j.sqlite"))
    with serve_app(create_app(config)) as base:
        with _open(base) as ws:
            recv_json(ws)
            _send(ws, pcm, pace=2.0)
            whole = _finish(ws)
        ws = _open(base)
        token = recv_json(ws)["resume_token"]
        _send(ws, pcm[:9 * 32000], pace=2.0)
        _settle(ws)
        _drop(ws)
        wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
        with _open(base, f"?resume={token}") as again:
            resumed = recv_json(again)
            _send(again, pcm[resumed["received_bytes"]:], pace=2.0)
            final = _finish(again)

    def text(update):
        return " ".join(_words(update))

    def speakers(update):
        return {line["speaker"] for line in update["lines"] if line["speaker"] > 0}

    assert resumed["resumed"] is True and resumed["received_bytes"] > 0
    reference = clip.reference
    assert wer(reference, text(final)) <= wer(reference, text(whole)) + 0.1, (text(whole), text(final))
    assert new_repeats(reference, text(final)) == 0, text(final)
    assert lost_ending(reference, text(final)) <= lost_ending(reference, text(whole))  # (tiny.en drops this
    # clip's last two words on its own; the resume must not lose more)
    # Both people, before and after the drop. (Exactly two is not asserted here: on this recording the
    # diarizer may give the father's later voice a third label, as in an uninterrupted stream; see
    # tests/test_real_speakers.py.)
    assert speakers(final) >= {1, 2} and speakers(whole) >= {1, 2}


def test_streams_parked_for_resume_never_keep_a_new_client_out(base):
    """Both slots held by dropped streams: a new client is admitted in the oldest one's slot, whose token
    then opens nothing, while the other parked stream can still resume. A client that opens and drops
    sockets in a loop never fills the server."""
    first, second = _open(base), _open(base)
    tokens = [recv_json(ws)["resume_token"] for ws in (first, second)]
    for ws in (first, second):
        _send(ws, tone(1.0))
    _drop(first)
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
    _drop(second)
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 2)
    assert gpu_status(base)["active_connections"] == 0

    newcomer = _open(base)
    assert recv_json(newcomer)["type"] == "config"  # not 1008: it took the oldest parked stream's slot
    status = gpu_status(base)
    assert (status["active_connections"], status["held_for_resume"]) == (1, 1)
    with _open(base, f"?resume={tokens[0]}") as stale:
        with pytest.raises(ConnectionClosed) as closed:
            stale.recv(timeout=10)
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "Unknown or expired session")
    with _open(base, f"?resume={tokens[1]}") as back:
        assert recv_json(back)["resumed"] is True
        back.close()
    newcomer.close()
    wait_for(lambda: gpu_status(base)["active_connections"] == 0)

    for _ in range(12):  # open, send, vanish: each parks a stream (at most the slots are ever held)
        ws = _open(base)
        assert recv_json(ws)["type"] == "config"
        ws.send(tone(0.3))
        _drop(ws)
        assert gpu_status(base)["held_for_resume"] <= 2
    with _open(base) as last:
        assert recv_json(last)["type"] == "config"
    metrics = httpx.get(f"http://{base}/metrics").text
    assert 'streamserver_held_for_resume{gpu_id="0"}' in metrics
