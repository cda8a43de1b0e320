"""Three servers behind a real HAProxy (deploy/haproxy/haproxy.cfg, Debian's `haproxy`) on 127.0.0.1.

The servers are the real serve path (flags, uvicorn, /ready, drain) with fake models and 2 slots
each (`tests.fake_server`). New streams spread by least connections; a full server is skipped;
when all are full the client gets a 503 with the contract's JSON error; SIGTERM on one server
finishes its streams with their last update while new streams go to the others; after `kill -9`
HAProxy marks it down and the others keep serving.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.live import drain_until_closed, free_port, open_asr, recv_json, start_server_process

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy is not installed (apt)")

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "haproxy"
SLOTS = 2


def haproxy_config(tmp: Path, listen: int, backends: list[int]) -> tuple[Path, Path]:
    """The shipped config with this machine's addresses: (config file, stats socket)."""
    text = (DEPLOY / "haproxy.cfg").read_text()
    stats = tmp / "haproxy.sock"
    text = text.replace("/run/haproxy/streamserver.sock", str(stats))
    text = text.replace("errorfile 503 errors/", f"errorfile 503 {DEPLOY / 'errors'}/")
    text = text.replace("bind 0.0.0.0:8080", f"bind 127.0.0.1:{listen}")
    text = text.replace("maxconn 4\n", f"maxconn {SLOTS}\n")
    text = re.sub(r"\n    server .*", "", text)
    text += "".join(f"    server s{i} 127.0.0.1:{port}\n" for i, port in enumerate(backends))
    path = tmp / "haproxy.cfg"
    path.write_text(text)
    return path, stats


def test_the_shipped_config_checks_as_it_is_from_any_folder(tmp_path):
    """`haproxy -c` on deploy/haproxy/haproxy.cfg unchanged, run from elsewhere: its error file (503 with
    Retry-After) is found beside it."""
    check = subprocess.run(["haproxy", "-c", "-f", str(DEPLOY / "haproxy.cfg")], cwd=tmp_path,
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "Retry-After: " in (DEPLOY / "errors" / "streamserver-503.http").read_text()


def server_states(stats: Path) -> dict[str, str]:
    """Each server's status (UP, DOWN, ...) from HAProxy's stats socket."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(stats))
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
    return {r[1]: r[17] for r in rows if r[0] == "streamservers" and r[1] not in ("FRONTEND", "BACKEND")}


def wait(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def connections(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/gpu-status", timeout=5).json()["total_connections"]


@pytest.fixture
def cluster(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    servers = []
    for _ in range(3):
        proc, base = start_server_process(
            ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--max-connections-per-gpu", str(SLOTS),
             "--refuse-when-full", "http", "--pcm-input", "--drain-seconds", "10"], env=env, cwd=root)
        servers.append((proc, int(base.rsplit(":", 1)[1])))
    listen = free_port()
    config, stats = haproxy_config(tmp_path, listen, [port for _, port in servers])
    haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait(lambda: stats.exists() and set(server_states(stats).values()) == {"UP"})
        yield f"127.0.0.1:{listen}", servers, stats
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for proc, _ in servers:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


def open_stream(base: str, ports: list[int]) -> tuple[object, int]:
    """A stream through HAProxy, and the port of the server it landed on (whose count went up)."""
    before = [connections(p) for p in ports]
    ws = open_asr(base)
    assert recv_json(ws)["type"] == "config"
    after = [connections(p) for p in ports]
    grew = [p for p, a, b in zip(ports, before, after) if b == a + 1]
    assert len(grew) == 1, (before, after)
    return ws, grew[0]


def test_streams_spread_skip_full_servers_and_survive_a_drain_and_a_crash(cluster):
    base, servers, stats = cluster
    ports = [port for _, port in servers]
    streams = [open_stream(base, ports) for _ in range(3)]
    assert sorted(p for _, p in streams) == sorted(ports)  # least connections: one on each server
    streams += [open_stream(base, ports) for _ in range(3)]
    assert [connections(p) for p in ports] == [SLOTS] * 3

    with pytest.raises(InvalidStatus) as refused:  # every slot taken: a refusal the client understands
        open_asr(base)
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body) == {"error": "No GPU resources available"}
    assert "Retry-After" in refused.value.response.headers

    # Room on server 1 only: the next stream goes there, past the full servers 0 and 2.
    victim = next(item for item in streams if item[1] == ports[1])
    victim[0].close()
    streams.remove(victim)
    wait(lambda: connections(ports[1]) == 1 and server_states(stats)["s1"] == "UP")
    streams.append(open_stream(base, ports))
    assert streams[-1][1] == ports[1]

    # SIGTERM on server 0: its streams end with their last update and 1001; new ones go elsewhere.
    servers[0][0].send_signal(signal.SIGTERM)
    for ws, port in [item for item in streams if item[1] == ports[0]]:
        messages, code = _until_closed(ws)
        assert code == 1001 and any("lines" in m for m in messages)
    wait(lambda: server_states(stats)["s0"] != "UP")
    room = next(item for item in streams if item[1] == ports[2])
    room[0].close()
    wait(lambda: connections(ports[2]) == 1 and server_states(stats)["s2"] == "UP")
    ws = open_asr(base)
    assert recv_json(ws)["type"] == "config"
    assert connections(ports[2]) == SLOTS

    # kill -9 on server 1: HAProxy marks it down; server 2 keeps serving.
    servers[1][0].kill()
    wait(lambda: server_states(stats)["s1"] == "DOWN")
    ws.close()
    wait(lambda: connections(ports[2]) == 1 and server_states(stats)["s2"] == "UP")
    last = open_asr(base)
    assert recv_json(last)["type"] == "config"
    last.send(b"\x00\x00" * 1600)
    last.send(b"")
    assert [m.get("type") for m in drain_until_closed(last)][-1] == "ready_to_stop"


def _until_closed(ws) -> tuple[list[dict], int]:
    messages = []
    try:
        while True:
            messages.append(json.loads(ws.recv(timeout=30)))
    except ConnectionClosed as closed:
        return messages, closed.rcvd.code if closed.rcvd else -1
