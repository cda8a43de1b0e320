"""Viewers of an `/asr` stream (CONTRACT section 7): the `config` carries a viewer link; its socket
streams the same captions (incremental), takes no slot, stays through the speaker's resume, ends with
the stream; a wrong key or too many viewers are refused clearly. Real sockets, fake models."""
from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader, tone
from tests.live import gpu_status, open_asr, recv_json, serve_app, wait_for

FRAME = 3200


@pytest.fixture
def base():
    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=1, pcm_input=True,
                                  max_viewers_per_stream=3, resume_seconds=30), loader=fake_loader)
    with serve_app(app) as url:
        yield url


def watch(base: str, viewer_url: str):
    link = urlparse(viewer_url)
    stream_id = link.path.rsplit("/", 1)[1]
    key = parse_qs(link.query)["key"][0]
    return connect(f"ws://{base}/asr/watch/{stream_id}?key={key}", open_timeout=10, max_size=None)


def send(ws, pcm: bytes, pace: float = 5.0) -> None:
    for i in range(0, len(pcm), FRAME):
        ws.send(pcm[i:i + FRAME])
        time.sleep(0.1 / pace)


def follow(ws, out: dict) -> None:
    """A viewer's loop: apply every update, note the close."""
    lines: list[dict] = []
    try:
        while True:
            msg = json.loads(ws.recv(timeout=60))
            if "lines" in msg:
                assert msg["from_line"] <= len(lines)
                lines = lines[: msg["from_line"]] + msg["lines"]
                out["lines"] = lines
            else:
                out.setdefault("other", []).append(msg)
    except ConnectionClosed as closed:
        out["close"] = (closed.rcvd.code, closed.rcvd.reason)


def speech() -> bytes:
    pause = tone(2.5, amplitude=0.002)
    return tone(3.0) + pause + tone(3.0, amplitude=0.05) + pause + tone(2.0)


def test_viewers_see_the_speakers_captions_take_no_slot_and_end_with_the_stream(base):
    ws = open_asr(base)
    config = recv_json(ws)
    assert config["viewer_url"].startswith(f"/watch/{config['connection_id']}?key=")
    assert config["resume_token"] not in config["viewer_url"]
    page = httpx.get(f"http://{base}{config['viewer_url']}")
    assert page.status_code == 200 and "captions.js" in page.text

    viewers = [watch(base, config["viewer_url"]) for _ in range(3)]
    hellos = [recv_json(v) for v in viewers]
    assert all(h["type"] == "config" and h["mode"] == "incremental" and h["viewer"] for h in hellos)
    seen = [{} for _ in viewers]
    threads = [threading.Thread(target=follow, args=(v, out)) for v, out in zip(viewers, seen)]
    for t in threads:
        t.start()
    wait_for(lambda: gpu_status(base)["viewers"] == 3)
    assert gpu_status(base)["active_connections"] == 1  # the speaker only: viewers take no slot
    assert 'streamserver_viewers{gpu_id="0"} 3.0' in httpx.get(f"http://{base}/metrics").text

    send(ws, speech())
    ws.send(b"")
    last = None
    while (msg := recv_json(ws)).get("type") != "ready_to_stop":
        last = msg
    for t in threads:
        t.join(30)
    for out in seen:
        assert out["close"] == (1000, "")
        assert out["lines"] == last["lines"]
    assert len([ln for ln in last["lines"] if ln["speaker"] > 0]) >= 2
    wait_for(lambda: gpu_status(base)["viewers"] == 0)


def test_a_wrong_key_or_an_unknown_stream_is_refused_before_any_message(base):
    with open_asr(base) as ws:
        config = recv_json(ws)
        stream_id = config["connection_id"]
        for url in (f"/asr/watch/{stream_id}?key=wrong", f"/asr/watch/{stream_id}",
                    f"/asr/watch/not-a-stream?key={parse_qs(urlparse(config['viewer_url']).query)['key'][0]}"):
            with connect(f"ws://{base}{url}", open_timeout=10) as viewer:
                with pytest.raises(ConnectionClosed) as closed:
                    viewer.recv(timeout=10)
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "Unknown stream")


def test_viewers_past_the_limit_are_refused_with_1013(base):
    with open_asr(base) as ws:
        config = recv_json(ws)
        viewers = [watch(base, config["viewer_url"]) for _ in range(3)]
        for v in viewers:
            assert recv_json(v)["type"] == "config"
        with watch(base, config["viewer_url"]) as extra:
            with pytest.raises(ConnectionClosed) as closed:
                extra.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1013, "Too many viewers")
        viewers[0].close()
        wait_for(lambda: gpu_status(base)["viewers"] == 2)
        with watch(base, config["viewer_url"]) as again:  # a place freed: admitted
            assert recv_json(again)["type"] == "config"


def test_a_viewer_stays_through_the_speakers_resume(base):
    ws = open_asr(base)
    config = recv_json(ws)
    viewer = watch(base, config["viewer_url"])
    recv_json(viewer)
    out: dict = {}
    follower = threading.Thread(target=follow, args=(viewer, out))
    follower.start()
    pcm = speech()
    half = len(pcm) // 2 // FRAME * FRAME
    send(ws, pcm[:half])
    time.sleep(1.0)
    ws.socket.shutdown(socket.SHUT_RDWR)  # the speaker's network goes
    ws.socket.close()
    wait_for(lambda: gpu_status(base)["held_for_resume"] == 1)
    assert "close" not in out
    with open_asr(base, f"resume={config['resume_token']}") as again:
        resumed = recv_json(again)
        assert resumed["resumed"] is True and resumed["viewer_url"] == config["viewer_url"]
        send(again, pcm[resumed["received_bytes"]:])
        again.send(b"")
        last = None
        while (msg := recv_json(again)).get("type") != "ready_to_stop":
            last = msg
    follower.join(30)
    assert out["close"] == (1000, "") and out["lines"] == last["lines"]
