"""End to end with the real tiny.en weights: speech in at real-time pace, the right words out.

The speech is made with espeak-ng (about 11 s); it goes over a real socket as
PCM and as webm/opus, while another connection sends garbage.
"""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from bench.metrics import wer
from streamserver.app import create_app
from streamserver.config import ServerConfig
from streamserver.ops.metrics import CPU_STAGES
from tests.live import drain_until_closed, open_asr, recv_json, serve_app
from tests.metrics_text import scrape, value

pytestmark = pytest.mark.slow

REFERENCE = (
    "And so my fellow Americans, ask not what your country can do for you, "
    "ask what you can do for your country."
)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("speech")
    raw, wav = d / "raw.wav", d / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-g", "4", "-w", str(raw), REFERENCE], check=True)
    # a second of silence before, two after: the VAD has to find the speech
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(wav), "pad", "1", "2"], check=True)
    webm = d / "speech.webm"
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-i", str(wav), "-c:a", "libopus", "-b:a", "32k",
                    "-f", "webm", str(webm)], check=True)
    return {"wav": wav, "webm": webm}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.getbasetemp() / "model-cache"
    app = create_app(ServerConfig(cache_dir=str(cache), idle_unload_seconds=0))
    with serve_app(app) as base:
        yield base


def pcm_bytes(wav: Path) -> bytes:
    return subprocess.run(["sox", str(wav), "-t", "s16", "-r", "16000", "-c", "1", "-"],
                          check=True, capture_output=True).stdout


def stream_realtime(base: str, fmt: str, data: bytes, seconds: float, pieces_per_second: int = 10) -> list[dict]:
    """Send `data` spread evenly over `seconds` of wall time, then the end-of-stream frame."""
    ws = open_asr(base, f"format={fmt}")
    config = recv_json(ws, timeout=60)
    assert config["type"] == "config" and config["format"] == fmt
    n = int(seconds * pieces_per_second)
    step = -(-len(data) // n)
    messages: list[dict] = []

    def reader() -> None:
        messages.extend(drain_until_closed(ws, timeout=180))

    t = threading.Thread(target=reader)
    t.start()
    t0 = time.monotonic()
    for i in range(n):
        time.sleep(max(0.0, t0 + i / pieces_per_second - time.monotonic()))
        ws.send(data[i * step:(i + 1) * step])
    ws.send(b"")
    t.join(200)
    assert ws.close_code == 1000
    return messages


def check_transcript(messages: list[dict], audio_seconds: float) -> str:
    assert messages[-1] == {"type": "ready_to_stop"}
    updates = [m for m in messages if "lines" in m]
    final = updates[-1]
    assert final["buffer_transcription"] == "" and final["remaining_time_transcription"] == 0.0
    # committed lines never change their text: each update's lines extend the previous ones
    for before, after in zip(updates, updates[1:]):
        done = before["lines"][:-1]  # the last line may still grow
        assert after["lines"][: len(done)] == done
        if before["lines"]:
            assert after["lines"][len(done)]["text"].startswith(before["lines"][-1]["text"])
    speech_lines = [ln for ln in final["lines"] if ln["speaker"] != -2]
    text = " ".join(ln["text"] for ln in speech_lines)
    assert wer(REFERENCE, text) <= 0.10, text
    for ln in final["lines"]:
        assert 0.0 <= ln["start_s"] <= ln["end_s"] <= audio_seconds + 0.5
    # speech starts after the leading second of silence, and lines are in time order
    assert 0.6 <= speech_lines[0]["start_s"] <= 2.0
    starts = [ln["start_s"] for ln in final["lines"]]
    assert starts == sorted(starts)
    return text


def cpu_by_stage(base: str) -> dict[str, float]:
    m = scrape(base)
    return {stage: value(m, "streamserver_compute_cpu_seconds_total", gpu_id=0, stage=stage) for stage in CPU_STAGES}


def test_pcm_at_realtime_pace(server, speech):
    data = pcm_bytes(speech["wav"])
    seconds = len(data) / 32000
    before, cpu = cpu_by_stage(server), time.process_time()
    messages = stream_realtime(server, "pcm", data, seconds)
    check_transcript(messages, seconds)
    # captions arrived while audio was still flowing, not only at the end
    assert sum(1 for m in messages if "lines" in m) >= 5
    # /metrics says where the server's CPU went (the server runs in this process): Whisper's encoder
    # and decoder and the VAD, no file work, and no more than the process spent in all
    spent = {stage: t - before[stage] for stage, t in cpu_by_stage(server).items()}
    assert spent["encoder"] > 0 and spent["decoder"] > 0 and spent["vad"] > 0
    assert spent["file"] == 0 and spent["diarization"] == 0
    assert sum(spent.values()) <= time.process_time() - cpu


def test_webm_opus_at_realtime_pace_with_garbage_next_door(server, speech):
    data = speech["webm"].read_bytes()
    seconds = len(pcm_bytes(speech["wav"])) / 32000
    outcome: dict = {}

    def garbage() -> None:
        time.sleep(2.0)
        ws = open_asr(server, "format=webm")
        recv_json(ws, timeout=60)
        ws.send(b"this is not webm at all" * 10)
        try:
            outcome["error"] = recv_json(ws, timeout=30)
            ws.recv(timeout=30)
        except ConnectionClosed as closed:
            outcome["close"] = (closed.rcvd.code, closed.rcvd.reason)

    g = threading.Thread(target=garbage)
    g.start()
    messages = stream_realtime(server, "webm", data, seconds)
    g.join(60)
    check_transcript(messages, seconds)
    assert outcome["error"]["type"] == "error" and outcome["error"]["code"] == 1007
    assert outcome["error"]["error"].startswith("Audio decode error")
    assert outcome["close"][0] == 1007 and outcome["close"][1].startswith("Audio decode error")
