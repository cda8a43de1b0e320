"""`?updates=incremental` on `/asr` (CONTRACT section 7): the lines that changed since the last update,
with `seq` and `from_line`; `{"type": "snapshot"}` asks for everything again; updates coalesced to
`--max-updates-per-second`. Real sockets, fake models (one word a second of tone)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from websockets.exceptions import ConnectionClosed

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader, tone
from tests.live import open_asr, recv_json, serve_app

FRAME = 3200  # 0.1 s of 16 kHz s16le


@pytest.fixture
def base():
    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True, silence_line_seconds=1.0,
                                  max_updates_per_second=4), loader=fake_loader)
    with serve_app(app) as url:
        yield url


def speech() -> bytes:
    """Utterances with pauses between them: many lines (speech and silence) over the stream."""
    pause = tone(3.0, amplitude=0.002)  # past the 2-s utterance pause, and a silence line
    return b"".join(tone(2.0) + pause for _ in range(6))


def send_paced(ws, pcm: bytes, pace: float = 4.0) -> None:
    for i in range(0, len(pcm), FRAME):
        ws.send(pcm[i:i + FRAME])
        time.sleep(0.1 / pace)
    ws.send(b"")


def stream(base: str, query: str) -> tuple[dict, list[tuple[float, str]]]:
    """Stream `speech()` and collect every text frame (arrival time, raw text) until the close."""
    ws = open_asr(base, query)
    config = recv_json(ws)
    sender = threading.Thread(target=send_paced, args=(ws, speech()))
    sender.start()
    frames = []
    try:
        while True:
            frames.append((time.monotonic(), ws.recv(timeout=60)))
    except ConnectionClosed as closed:
        assert closed.rcvd.code == 1000
    sender.join()
    return config, frames


def apply(lines: list[dict], update: dict) -> list[dict]:
    """What a client holds after an incremental update."""
    assert 0 <= update["from_line"] <= len(lines)
    return lines[: update["from_line"]] + update["lines"]


def test_incremental_updates_rebuild_the_same_captions_as_whole_ones_and_stay_small(base):
    full_config, full = stream(base, "")
    config, frames = stream(base, "updates=incremental")
    assert full_config["mode"] == "full" and config["mode"] == "incremental"

    updates = [json.loads(text) for _, text in frames if "lines" in json.loads(text)]
    assert [u["seq"] for u in updates] == list(range(1, len(updates) + 1))
    assert updates[0]["from_line"] == 0
    lines: list[dict] = []
    for update in updates:
        lines = apply(lines, update)
        # every update carries the changed tail only: at most the last line sent before, plus new ones
        assert len(update["lines"]) <= 2 or update["from_line"] == 0
    whole = [json.loads(text) for _, text in full if "lines" in json.loads(text)]
    assert lines == whole[-1]["lines"]
    assert len([ln for ln in lines if ln["speaker"] == -2]) >= 4 and len(lines) >= 9
    assert json.loads(frames[-1][1]) == {"type": "ready_to_stop"}
    # The last whole update carries every line; the incremental ones stay the size of a line or two.
    biggest = max(len(text) for _, text in frames if '"lines"' in text)
    assert biggest < len(next(text for _, text in reversed(full) if '"lines"' in text))


def test_a_client_that_asks_for_a_snapshot_gets_every_line_in_the_next_update(base):
    ws = open_asr(base, "updates=incremental")
    recv_json(ws)
    pcm = speech()
    for i in range(0, len(pcm) * 2 // 3, FRAME):
        ws.send(pcm[i:i + FRAME])
        time.sleep(0.025)
    lines: list[dict] = []
    seq = 0
    deadline = time.monotonic() + 30
    while len(lines) < 4 and time.monotonic() < deadline:
        update = recv_json(ws)
        seq = update["seq"]
        lines = apply(lines, update)
    assert len(lines) >= 4
    ws.send(json.dumps({"type": "snapshot"}))
    while True:
        update = recv_json(ws)
        assert update["seq"] == seq + 1
        seq = update["seq"]
        if update["from_line"] == 0:
            break
        lines = apply(lines, update)
    assert len(update["lines"]) >= len(lines) - 1 and update["lines"][: len(lines) - 1] == lines[:-1]
    ws.send(b"")
    while recv_json(ws).get("type") != "ready_to_stop":
        pass


def test_updates_are_coalesced_to_the_configured_rate():
    """However fast the stream is processed (here much faster than real time), a socket gets at most
    `--max-updates-per-second` updates a second; the last update still carries every word."""
    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True, max_updates_per_second=2),
                     loader=fake_loader)
    with serve_app(app) as url:
        _, frames = stream(url, "updates=incremental")
    times = [t for t, text in frames if '"lines"' in text]
    for a, b in zip(times, times[2:]):  # any two gaps: at least one coalescing interval between sends
        assert b - a >= 0.45
    lines: list[dict] = []
    for _, text in frames:
        if '"lines"' in text:
            lines = apply(lines, json.loads(text))
    assert sum(len(ln["text"].split()) for ln in lines) >= 12


def test_an_unknown_updates_mode_is_refused(base):
    ws = open_asr(base, "updates=diff")
    message = recv_json(ws)
    assert message["type"] == "error" and "updates" in message["error"]
    with pytest.raises(ConnectionClosed) as closed:
        ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1008


def test_any_other_text_frame_is_still_refused(base):
    ws = open_asr(base, "updates=incremental")
    recv_json(ws)
    ws.send(json.dumps({"type": "hello"}))
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ws.recv(timeout=10)
    assert closed.value.rcvd.code == 1003
