"""Graceful drain on SIGTERM, through the real serve path (`tests/fake_server.py`: the CLI with fake models).

A gate file holds transcription mid-step, so the drain is observed while it is
under way without relying on timing.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from streamserver.ops.drain import Drain
from tests.fakes import tone
from tests.live import open_asr, recv_json, start_server_process
from tests.metrics_text import scrape, value

ROOT = Path(__file__).resolve().parents[1]


class FakeServerProcess:
    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.gate = tmp_path / "gate"
        self.proc, self.base = start_server_process(
            ["-m", "tests.fake_server", "--pcm-input", *flags], cwd=ROOT,
            env=dict(os.environ, FAKE_ASR_GATE=str(self.gate)))

    def ready(self) -> tuple[int, dict]:
        r = httpx.get(f"http://{self.base}/ready")
        return r.status_code, r.json()

    def received_seconds(self) -> float:
        return value(scrape(self.base), "streamserver_audio_received_seconds_total", gpu_id=0)

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        self.gate.unlink(missing_ok=True)
        try:
            out = self.proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out = self.proc.communicate()[0]
            pytest.fail(f"server did not exit:\n{out}")
        return self.proc.returncode, out


@pytest.fixture
def server(tmp_path):
    servers = []

    def start(*flags: str) -> FakeServerProcess:
        servers.append(FakeServerProcess(tmp_path, "--simulate-gpus", "1x16", *flags))
        return servers[-1]

    yield start
    for s in servers:
        if s.proc.poll() is None:
            s.proc.kill()
            s.proc.communicate()


def stream_until_committed(ws) -> dict:
    """Half-second chunks, one update read after each, until a word is committed."""
    half = tone(0.5)
    for _ in range(20):
        ws.send(half)
        update = recv_json(ws)
        if update["lines"]:
            return update
    pytest.fail("nothing was committed")


def hold_mid_step(server: FakeServerProcess, ws) -> None:
    """Close the gate, then send audio the stream must transcribe before its last update."""
    server.gate.touch()
    before = server.received_seconds()
    ws.send(tone(2.0))
    deadline = time.monotonic() + 30
    while server.received_seconds() < before + 2.0:  # the server holds the audio
        assert time.monotonic() < deadline
        time.sleep(0.02)


def messages_until_close(ws) -> tuple[list[dict], int, str]:
    out = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            out.append(recv_json(ws, timeout=60))
    return out, closed.value.rcvd.code, closed.value.rcvd.reason


def test_sigterm_drains_each_stream_with_its_last_update_then_exits_0(server):
    s = server("--drain-seconds", "120")
    ws = open_asr(s.base)
    recv_json(ws)
    committed = stream_until_committed(ws)
    hold_mid_step(s, ws)

    s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while s.ready()[0] == 200:
        assert time.monotonic() < deadline, "/ready never turned to draining"
        time.sleep(0.02)
    code, body = s.ready()
    assert (code, body["ready"], body["reason"], body["free_slots"]) == (503, False, "draining", 0)
    assert httpx.get(f"http://{s.base}/gpu-status").json()["draining"] is True
    late = open_asr(s.base)
    with pytest.raises(ConnectionClosed) as refused:
        late.recv(timeout=10)
    assert (refused.value.rcvd.code, refused.value.rcvd.reason) == (1001, "Server is draining")
    assert s.proc.poll() is None  # still draining: the stream is held mid-step

    s.gate.unlink()
    messages, code, reason = messages_until_close(ws)
    assert (code, reason) == (1001, "Server shutting down")
    assert all(m.get("type") not in ("error", "ready_to_stop") for m in messages)
    final = messages[-1]
    assert final["buffer_transcription"] == "" and final["remaining_time_transcription"] == 0.0
    # everything was committed: the 4-odd seconds sent before the signal and the 2 held mid-step
    words = final["lines"][0]["text"].split()
    assert words[: len(committed["lines"][0]["text"].split())] == committed["lines"][0]["text"].split()
    assert final["lines"][-1]["end_s"] > committed["lines"][-1]["end_s"] + 2.0
    rc, out = s.finish()
    assert rc == 0, out
    assert "Traceback" not in out and "Drained" in out


def test_a_stream_still_busy_when_the_grace_period_ends_is_cut_with_1001(server):
    s = server("--drain-seconds", "0.5")
    ws = open_asr(s.base)
    recv_json(ws)
    stream_until_committed(ws)
    hold_mid_step(s, ws)  # and the gate stays closed past the grace period

    s.proc.send_signal(signal.SIGTERM)
    messages, code, reason = messages_until_close(ws)
    assert (code, reason) == (1001, "Server shutting down")
    assert messages[-1] == {"type": "error", "status": "error", "error": "Server shutting down", "code": 1001}
    rc, out = s.finish()  # opening the gate lets the held inference thread end
    assert rc == 0, out
    assert "cutting 1 streams" in out


def test_sigterm_with_no_streams_exits_0_at_once(server):
    s = server()
    s.proc.send_signal(signal.SIGTERM)
    rc, out = s.finish()
    assert rc == 0, out


# -- the Drain object on its own ----------------------------------------------
class FakeStream:
    def __init__(self, drain: Drain, finishes: bool) -> None:
        self.drain, self.finishes = drain, finishes
        self.events: list[str] = []

    def begin_drain(self) -> None:
        self.events.append("drain")
        if self.finishes:
            asyncio.get_running_loop().call_soon(self.drain.unregister, self)

    def abort(self) -> None:
        self.events.append("abort")
        asyncio.get_running_loop().call_soon(self.drain.unregister, self)


def test_drain_waits_for_streams_and_cuts_the_ones_that_do_not_finish():
    async def scenario() -> tuple[FakeStream, FakeStream, Drain]:
        drain = Drain()
        polite, stuck = FakeStream(drain, True), FakeStream(drain, False)
        drain.register(polite)
        drain.register(stuck)
        await drain.run(0.05)
        return polite, stuck, drain

    polite, stuck, drain = asyncio.run(scenario())
    assert polite.events == ["drain"] and stuck.events == ["drain", "abort"]
    assert drain.draining and drain.live == 0
