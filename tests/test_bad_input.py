"""Bad input ends that connection with the contract's message and close code; the server carries on."""
from __future__ import annotations

import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader
from tests.live import drain_until_closed, open_asr, recv_json, serve_app


@pytest.fixture(scope="module")
def base():
    app = create_app(ServerConfig(simulate_gpus="1x16", max_frame_bytes=4096), loader=fake_loader)
    with serve_app(app) as url:
        yield url


def error_then_close(ws) -> tuple[dict, int, str]:
    error = recv_json(ws)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            msg = recv_json(ws)
            assert msg.get("type") != "config"
    return error, closed.value.rcvd.code, closed.value.rcvd.reason


def send_in_frames(ws, data: bytes, size: int = 4000) -> None:
    for i in range(0, len(data), size):
        ws.send(data[i:i + size])


def tone(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes()


@pytest.mark.parametrize(
    "query, payload, code, prefix",
    [
        ("format=pcm", "hello", 1003, "Expected binary audio frames"),
        ("format=webm", b"\x00garbage that is not webm", 1007, "Audio decode error"),
        ("format=auto", b"RIFF\x00\x00\x00\x00WAVE", 1007, "Audio decode error"),
        ("format=ogg", b"OggS" + bytes(200), 1007, "Audio decode error"),
        ("format=pcm", bytes(5000), 1009, "Frame too large"),
    ],
    ids=["text-frame", "not-webm", "auto-unknown", "bad-ogg", "too-large"],
)
def test_bad_input_gets_error_and_close_code(base, query, payload, code, prefix):
    good = open_asr(base, "format=pcm")
    recv_json(good)
    bad = open_asr(base, query)
    assert recv_json(bad)["type"] == "config"
    bad.send(payload)
    error, close_code, reason = error_then_close(bad)
    assert error["type"] == "error" and error["status"] == "error" and error["code"] == code
    assert error["error"].startswith(prefix) and reason.startswith(prefix)
    # the neighbour still streams and finishes normally
    send_in_frames(good, tone(2.0))
    good.send(b"")
    messages = drain_until_closed(good)
    assert messages[-1] == {"type": "ready_to_stop"} and good.close_code == 1000
    assert "w0" in " ".join(ln["text"] for ln in messages[-2]["lines"])


def test_end_of_stream_gives_last_update_ready_to_stop_and_1000(base):
    ws = open_asr(base, "format=pcm")
    recv_json(ws)
    send_in_frames(ws, bytes(16000 * 2 * 3))  # 3 s of silence
    send_in_frames(ws, tone(2.5)[:-1])  # odd length: the last byte waits for a partner that never comes
    ws.send(b"")
    messages = drain_until_closed(ws)
    assert ws.close_code == 1000
    assert messages[-1] == {"type": "ready_to_stop"}
    final = messages[-2]
    assert final["status"] == "active_transcription" and final["buffer_transcription"] == ""
    assert final["lines"][0]["speaker"] == -2 and final["lines"][0]["text"] == ""  # the leading silence
    assert final["lines"][1]["speaker"] == 1 and final["lines"][1]["text"].startswith("w0")


def test_silence_only_reports_no_audio_detected(base):
    ws = open_asr(base, "format=pcm")
    recv_json(ws)
    send_in_frames(ws, bytes(16000 * 2 * 2))
    ws.send(b"")
    messages = drain_until_closed(ws)
    assert all(m["status"] == "no_audio_detected" for m in messages if "lines" in m)


def test_unknown_format_is_refused(base):
    ws = open_asr(base, "format=mp3")
    error, code, reason = error_then_close(ws)
    assert code == 1008 and error["error"].startswith("Unsupported format")


def failing_loader(device):
    raise RuntimeError("checkpoint is corrupt")


def oom_loader(device):
    raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("loader, prefix", [(failing_loader, "Model load failed on GPU 0"),
                                            (oom_loader, "GPU memory full on GPU 0")])
def test_a_failed_model_load_reaches_every_waiting_client_and_frees_slots(loader, prefix):
    import httpx

    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=loader)
    with serve_app(app) as url:
        sockets = [open_asr(url, "format=pcm") for _ in range(3)]
        for ws in sockets:
            assert recv_json(ws)["type"] == "config"
        for ws in sockets:
            error, code, reason = error_then_close(ws)
            assert code == 1011 and error["error"].startswith(prefix) and reason.startswith(prefix)
        deadline = time.monotonic() + 5
        while httpx.get(f"http://{url}/gpu-status").json()["total_connections"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert httpx.get(f"http://{url}/health").status_code == 200


def test_updates_keep_coming_while_the_worker_is_busy():
    """At least once a second while audio flows, even when inference is slow: the client then
    sees the same captions with remaining time growing."""
    import threading

    from tests.fakes import EchoASR

    release = threading.Event()

    class StuckASR(EchoASR):
        def transcribe(self, audio, prompt="", language=None):
            release.wait(120)
            return super().transcribe(audio, prompt, language)

    def loader(device):
        models = fake_loader(device)
        models.asr = StuckASR()
        return models

    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=loader)
    with serve_app(app) as url:
        ws = open_asr(url, "format=pcm")
        recv_json(ws)
        remaining = []
        try:
            for _ in range(40):  # Whisper is stuck on the first second of speech
                if len(remaining) >= 4:
                    break
                send_in_frames(ws, tone(0.5))
                try:
                    msg = recv_json(ws, timeout=0.5)
                except TimeoutError:
                    continue
                remaining.append(msg["remaining_time_transcription"])
        finally:
            release.set()
        ws.send(b"")
        assert drain_until_closed(ws)[-1] == {"type": "ready_to_stop"}
    assert len(remaining) >= 4 and remaining[-1] > remaining[0]
