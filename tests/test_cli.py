"""The command line: flags, STREAMSERVER_* variables, and `streamserver --simulate-gpus 4x16` over real sockets."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from streamserver.cli import parse_config
from tests.live import open_asr, recv_json, start_server_process


def test_defaults_match_the_contract(monkeypatch):
    for key in list(os.environ):
        if key.startswith("STREAMSERVER_"):
            monkeypatch.delenv(key)
    c = parse_config([])
    assert (c.host, c.port, c.model, c.max_connections_per_gpu, c.max_frame_bytes) == (
        "127.0.0.1", 8000, "tiny.en", 4, 1048576)
    assert (c.idle_unload_seconds, c.silence_line_seconds, c.drain_seconds) == (120, 2, 30)
    assert c.effective_language == "en" and c.default_format == "auto" and c.policy == "localagreement"


def test_environment_sets_flags_and_the_command_line_wins(monkeypatch):
    monkeypatch.setenv("STREAMSERVER_SIMULATE_GPUS", "2x8")
    monkeypatch.setenv("STREAMSERVER_PORT", "9001")
    monkeypatch.setenv("STREAMSERVER_PCM_INPUT", "true")
    monkeypatch.setenv("STREAMSERVER_GPUS", "0,1")
    c = parse_config(["--port", "9002"])
    assert c.simulate_gpus == "2x8" and c.port == 9002 and c.pcm_input and c.gpus == (0, 1)
    assert parse_config(["--max-connections-per-gpu", "7"]).max_connections_per_gpu == 7


@pytest.fixture
def cli_server(tmp_path):
    env = dict(os.environ, STREAMSERVER_CACHE_DIR=str(tmp_path / "cache"))
    proc, base = start_server_process(["-m", "streamserver", "--simulate-gpus", "4x16", "--pcm-input"], env=env)
    yield base, proc
    proc.terminate()
    proc.wait(30)


def test_simulated_four_gpus_admit_sixteen_and_refuse_the_seventeenth(cli_server):
    base, proc = cli_server
    sockets = []
    try:
        for i in range(16):
            ws = open_asr(base)
            assert recv_json(ws, timeout=30)["gpu_id"] == i % 4
            sockets.append(ws)
        extra = open_asr(base)
        with pytest.raises(ConnectionClosed) as closed:
            extra.recv(timeout=10)
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1008, "No GPU resources available")
        status = httpx.get(f"http://{base}/gpu-status").json()
        assert status["simulated"] is True and status["total_connections"] == 16
        assert [g["active_connections"] for g in status["gpus"]] == [4, 4, 4, 4]
        sockets.pop(0).close()
        deadline = time.monotonic() + 10
        while httpx.get(f"http://{base}/gpu-status").json()["total_connections"] != 15:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ws = open_asr(base)
        assert recv_json(ws, timeout=30)["gpu_id"] == 0
        sockets.append(ws)
    finally:
        for ws in sockets:
            ws.close()
    proc.terminate()
    out = proc.communicate(timeout=30)[0]
    assert "Rejected connection" in out and "No GPU resources available (16/16 connections)" in out
    assert "(Load: 4/4, Memory:" in out and "WebSocket opened on GPU 3" in out


def test_an_unknown_policy_is_refused_at_startup():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "streamserver", "--policy", "waitk", "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "--policy must be one of localagreement, alignatt" in out.stderr and "Traceback" not in out.stderr


def test_a_sortformer_checkpoint_that_is_missing_is_refused_at_startup(tmp_path):
    missing = tmp_path / "diar_streaming_sortformer_4spk-v2.nemo"
    proc = subprocess.run([sys.executable, "-m", "streamserver", "--diarization", "--sortformer-model", str(missing),
                           "--simulate-gpus", "1x4"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert f"--sortformer-model {missing}: no such file" in proc.stderr


def test_a_sortformer_checkpoint_nemo_cannot_restore_is_refused_at_startup(tmp_path):
    broken = tmp_path / "truncated.nemo"
    broken.write_bytes(b"not a tar archive")  # a download cut short
    proc = subprocess.run([sys.executable, "-m", "streamserver", "--diarization", "--sortformer-model", str(broken),
                           "--simulate-gpus", "1x4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"streamserver: error: --sortformer-model {broken}: " in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("chosen", [None, "ACTIVE"])
def test_the_server_lets_idle_inference_threads_sleep_unless_the_operator_chose(chosen):
    """Before torch loads, the server asks OpenMP's idle workers to sleep at once (spinning between a
    round's small operators cost a fifth of a stream's CPU); an operator's own OMP_WAIT_POLICY wins."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if chosen:
        env["OMP_WAIT_POLICY"] = chosen
    probe = ("import os; from streamserver.ops import threads; changed = threads.passive_waits(); "
             "import torch; late = threads.passive_waits(); print(changed, late, os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == (["True", "False", "PASSIVE"] if chosen is None else ["False", "False", "ACTIVE"])
