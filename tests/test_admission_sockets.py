"""Admission over real sockets: the config message, round-robin placement, 1008 when full, freed slots."""
from __future__ import annotations

import socket
import time

import pytest
from websockets.exceptions import ConnectionClosed

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import FakeNvml, fake_loader
from tests.live import open_asr, recv_json, serve_app


@pytest.fixture(params=["fake-nvml", "simulated"])
def server_url(request):
    if request.param == "simulated":
        app = create_app(ServerConfig(simulate_gpus="4x16", pcm_input=True, resume_seconds=0), loader=fake_loader)
    else:
        app = create_app(ServerConfig(pcm_input=True, resume_seconds=0), loader=fake_loader,
                         nvml_factory=lambda: FakeNvml(4, 16.0))
    with serve_app(app) as base:
        yield base


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def active(base: str) -> int:
    import httpx

    return httpx.get(f"http://{base}/gpu-status").json()["total_connections"]


def test_sixteen_land_round_robin_and_the_seventeenth_is_refused(server_url):
    sockets = []
    try:
        for i in range(16):
            ws = open_asr(server_url)
            cfg = recv_json(ws)
            assert cfg["type"] == "config"
            assert cfg["gpu_id"] == i % 4
            assert cfg["device"] == f"cuda:{i % 4}"
            assert cfg["useAudioWorklet"] is True and cfg["format"] == "pcm" and cfg["mode"] == "full"
            assert len(cfg["connection_id"]) == 36
            sockets.append(ws)
        extra = open_asr(server_url)
        with pytest.raises(ConnectionClosed) as closed:
            extra.recv(timeout=10)
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason == "No GPU resources available"

        sockets.pop(6).close()  # a normal close frees a slot on device 2
        wait_for(lambda: active(server_url) == 15)
        ws = open_asr(server_url)
        assert recv_json(ws)["gpu_id"] == 2
        sockets.append(ws)
    finally:
        for ws in sockets:
            ws.close()
    wait_for(lambda: active(server_url) == 0)


def test_a_client_that_vanishes_frees_its_slot(server_url):
    ws = open_asr(server_url)
    recv_json(ws)
    ws.send(b"\x00\x01" * 8000)
    ws.socket.shutdown(socket.SHUT_RDWR)  # no close frame: the TCP connection just drops
    ws.socket.close()
    wait_for(lambda: active(server_url) == 0)  # (--resume-seconds 0 here: nothing is kept for it)


def test_gpu_status_shape(server_url):
    import httpx

    ws = open_asr(server_url)
    recv_json(ws)
    status = httpx.get(f"http://{server_url}/gpu-status").json()
    ws.close()
    assert status["total_gpus"] == 4 and status["max_connections_per_gpu"] == 4
    gpu0 = status["gpus"][0]
    assert set(gpu0) == {
        "gpu_id", "device", "name", "active_connections", "max_connections", "allocated_memory_gb",
        "free_memory_gb", "total_memory_gb", "utilization_percent", "models_loaded", "models",
        "batch_share",  # issue 8: the share of the device file jobs used lately
        "free_slots",  # issue 15: the room left on the device
        "held_for_resume",  # issue 16: slots kept for clients that dropped and may come back
        "viewers",  # issue 29: read-only viewers of the device's streams (they take no slot)
    }
    assert gpu0["free_slots"] == gpu0["max_connections"] - gpu0["active_connections"]
    assert gpu0["active_connections"] == 1 and gpu0["max_connections"] == 4
    assert gpu0["total_memory_gb"] == 16.0
    assert httpx.get(f"http://{server_url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("mode", ["close", "http"])
def test_a_full_server_refuses_as_told_and_a_freed_slot_admits_again(mode):
    import json

    import httpx
    from websockets.exceptions import InvalidStatus

    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=2, refuse_when_full=mode),
                     loader=fake_loader)
    with serve_app(app) as base:
        held = [open_asr(base), open_asr(base)]
        for ws in held:
            recv_json(ws)
        if mode == "close":  # the contract's default: upgraded, then closed
            extra = open_asr(base)
            with pytest.raises(ConnectionClosed) as closed:
                extra.recv(timeout=10)
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "No GPU resources available")
        else:  # told before the upgrade, so a proxy can retry elsewhere
            with pytest.raises(InvalidStatus) as refused:
                open_asr(base)
            response = refused.value.response
            assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
            assert json.loads(response.body) == {"error": "No GPU resources available"}
        status = httpx.get(f"http://{base}/gpu-status").json()
        assert status["total_connections"] == 2  # the refusal held no slot
        held.pop().close()
        wait_for(lambda: httpx.get(f"http://{base}/gpu-status").json()["total_connections"] == 1)
        again = open_asr(base)
        assert recv_json(again)["type"] == "config"
        again.close()
        for ws in held:
            ws.close()


def test_an_unknown_refusal_mode_is_refused_at_startup():
    with pytest.raises(ValueError, match="--refuse-when-full must be one of close, http"):
        create_app(ServerConfig(simulate_gpus="1x16", refuse_when_full="drop"), loader=fake_loader)


def test_with_refusals_as_http_a_draining_server_answers_the_upgrade_with_503():
    """What a proxy needs during a rollout: a server that has begun to drain says so before the upgrade,
    and the proxy sends the stream to another server instead of the client getting a 1001."""
    import json

    from websockets.exceptions import InvalidStatus

    app = create_app(ServerConfig(simulate_gpus="1x16", refuse_when_full="http"), loader=fake_loader)
    with serve_app(app) as base:
        app.state.server.drain.draining = True
        with pytest.raises(InvalidStatus) as refused:
            open_asr(base)
        app.state.server.drain.draining = False
    response = refused.value.response
    assert response.status_code == 503 and int(response.headers["Retry-After"]) > 0
    assert json.loads(response.body) == {"error": "Server is draining"}
