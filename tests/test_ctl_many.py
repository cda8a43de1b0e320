"""`streamserver status --url A --url B ...`: every server in one table with a TOTAL row.

Two real server processes (`tests.fake_server`: the serve path with stand-in models), one
address where nothing listens, and listeners that never answer (the servers are asked at
the same time, so two dead ones cost one timeout, not two).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from streamserver.ops import ctl
from tests.live import free_port, open_asr, recv_json, start_server_process, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "ops-token"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """A: 2 simulated 16 GB devices, 4 slots each; B: one 8 GB device, 3 slots. Both need TOKEN."""
    tmp = tmp_path_factory.mktemp("ctl_many")
    procs = []
    try:
        for name, flags in (("a", ["--simulate-gpus", "2x16"]),
                            ("b", ["--simulate-gpus", "1x8", "--max-connections-per-gpu", "3"])):
            env = dict(os.environ, PYTHONPATH=str(ROOT), STREAMSERVER_CACHE_DIR=str(tmp / name / "cache"),
                       STREAMSERVER_JOBS_DB=str(tmp / name / "jobs.sqlite"))
            procs.append(start_server_process(["-m", "tests.fake_server", *flags, "--api-token", TOKEN],
                                              env=env, cwd=ROOT))
        yield [f"http://{base}" for _, base in procs]
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.communicate(timeout=30)


def connections(url: str) -> int:
    return httpx.get(f"{url}/gpu-status", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total_connections"]


def cells(line: str) -> list[str]:
    """A table row's cells (columns are two or more spaces apart)."""
    return [c.strip() for c in line.split("  ") if c.strip()]


def test_three_urls_one_dead(servers):
    a, b = servers
    dead = f"http://127.0.0.1:{free_port()}"
    ws = open_asr(a.removeprefix("http://"), f"token={TOKEN}")
    try:
        assert recv_json(ws)["gpu_id"] == 0
        wait_for(lambda: connections(a) == 1)
        out = subprocess.run([sys.executable, "-m", "streamserver", "status", "--token", TOKEN,
                              "--url", a, "--url", dead, "--url", b],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    finally:
        ws.close()
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "3 server(s): 2 ready, 1 unreachable"
    assert cells(lines[2]) == ctl.MANY_HEADER
    rows = [cells(line) for line in lines[3:]]
    # server, state, gpu, device, name, connections, free slots, memory, models
    a0, a1, gone, b0, total = rows
    assert a0[:4] == [a, "ready", "0", "cuda:0"] and a0[5:7] == ["1/4", "3"] and a0[-1] == "whisper:fake, vad:fake"
    assert a1[:4] == [a, "ready", "1", "cuda:1"] and a1[5:7] == ["0/4", "4"] and a1[7].endswith("/16.00")
    assert a1[-1] == "-"
    assert b0[:4] == [b, "ready", "0", "cuda:0"] and b0[5:7] == ["0/3", "3"] and b0[7].endswith("/8.00")
    assert gone[:2] == [dead, "unreachable"] and gone[2].startswith(f"cannot reach {dead}/gpu-status")
    assert "Connection refused" in gone[2] and len(gone) == 3
    assert total[:3] == ["TOTAL", "2/3 up", "3 device(s)"]
    assert total[3:5] == ["1/11", "10"] and total[5].endswith("/40.00")


def test_the_live_servers_alone_exit_0_and_json_sums_them(servers, capsys):
    a, b = servers
    assert ctl.main(["status", "--token", TOKEN, "--url", a, "--url", b + "/"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("2 server(s): 2 ready\n") and "unreachable" not in out
    assert cells(out.splitlines()[-1])[:5] == ["TOTAL", "2/2 up", "3 device(s)", "0/11", "11"]

    assert ctl.main(["status", "--json", "--token", TOKEN, "--url", a, "--url", b.removeprefix("http://")]) == 0
    combined = json.loads(capsys.readouterr().out)
    assert [s["url"] for s in combined["servers"]] == [a, b]
    assert [s["state"] for s in combined["servers"]] == ["ready", "ready"]
    assert [len(s["status"]["gpus"]) for s in combined["servers"]] == [2, 1]
    t = combined["total"]
    assert (t["servers"], t["unreachable"], t["devices"], t["max_connections"], t["free_slots"]) == (2, 0, 3, 11, 11)
    assert t["total_memory_gb"] == 40.0


def test_a_wrong_token_is_an_error_row_and_the_others_still_show(servers, capsys):
    a, b = servers
    assert ctl.main(["status", "--token", "wrong", "--url", a, "--url", b]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "2 server(s): 2 error"
    assert cells(lines[3])[:2] == [a, "error"] and "HTTP 401" in lines[3] and "Unauthorized" in lines[3]
    assert cells(lines[-1])[:5] == ["TOTAL", "0/2 up", "0 device(s)", "0/0", "0"]


def test_a_single_url_keeps_its_own_table(servers, capsys):
    a, _ = servers
    assert ctl.main(["status", "--token", TOKEN, "--url", a]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{a}: 2 simulated device(s)") and lines[2].split()[:2] == ["GPU", "DEVICE"]


def test_servers_that_never_answer_cost_one_timeout_together(monkeypatch, capsys):
    listeners = []
    for _ in range(3):  # accept the TCP connection (backlog) and never answer the request
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        listeners.append(s)
    monkeypatch.setattr(ctl, "STATUS_TIMEOUT", 1.0)
    urls = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in listeners]
    try:
        started = time.monotonic()
        code = ctl.main(["status", *(x for u in urls for x in ("--url", u))])
        elapsed = time.monotonic() - started
    finally:
        for s in listeners:
            s.close()
    out = capsys.readouterr().out
    assert code == 1 and out.startswith("3 server(s): 3 unreachable")
    assert out.count("timed out") == 3
    assert elapsed < 2.5  # three 1 s timeouts, waited for side by side


def test_a_draining_server_has_no_free_slots():
    gpu = {"gpu_id": 0, "device": "cuda:0", "name": "sim", "active_connections": 2, "max_connections": 4,
           "free_slots": 0, "allocated_memory_gb": 1.5, "free_memory_gb": 14.5, "total_memory_gb": 16.0,
           "utilization_percent": 0.0, "models_loaded": True, "models": ["whisper:fake"]}
    older = dict(gpu, gpu_id=1, device="cuda:1")
    del older["free_slots"]  # a server from before free_slots: limit - active, none while draining
    draining = ctl.ServerReport("http://x:1", status={"draining": True, "gpus": [gpu, older]})
    full = ctl.ServerReport("http://y:1", status={"draining": False, "gpus": [dict(gpu, active_connections=4)]})
    roomy = ctl.ServerReport("http://z:1", status={"draining": False, "gpus": [older]})
    assert (draining.state, full.state, roomy.state) == ("draining", "full", "ready")
    t = ctl.totals([draining, full, roomy])
    assert (t["active_connections"], t["max_connections"], t["free_slots"]) == (10, 16, 2)
    text = ctl.format_many([draining, full, roomy])
    assert text.splitlines()[0] == "3 server(s): 1 ready, 1 full, 1 draining"
