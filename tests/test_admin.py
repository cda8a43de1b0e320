"""Admin endpoints (`/models/load`, `/models/unload`) and the operator's CLI (`streamserver status`, `models`)."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from gpu_manager import Device
from streamserver.app import create_app
from streamserver.cli import main
from streamserver.config import ServerConfig
from tests.fakes import fake_loader
from tests.live import free_port, open_asr, recv_json, serve_app, wait_for
from tests.metrics_text import per_gpu, scrape

TOKEN = "admin-token"


@pytest.fixture
def base():
    app = create_app(ServerConfig(simulate_gpus="2x16", api_token=TOKEN), loader=fake_loader)
    with serve_app(app) as url:
        yield url


def post(base: str, path: str) -> httpx.Response:
    return httpx.post(f"http://{base}{path}", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def status(base: str) -> dict:
    return httpx.get(f"http://{base}/gpu-status", headers={"Authorization": f"Bearer {TOKEN}"}).json()


def test_load_and_unload(base):
    r = post(base, "/models/load?gpu=1")
    assert r.status_code == 200
    entry = r.json()
    assert entry == status(base)["gpus"][1]
    assert entry["models_loaded"] is True and entry["models"] == ["whisper:fake", "vad:fake"]
    assert status(base)["gpus"][0]["models_loaded"] is False
    assert post(base, "/models/load?gpu=1").status_code == 200  # already loaded: no second load
    r = post(base, "/models/unload?gpu=1")
    assert r.status_code == 200 and r.json()["models_loaded"] is False and r.json()["models"] == []
    assert post(base, "/models/unload?gpu=1").status_code == 200  # nothing loaded: nothing to do
    m = scrape(base, TOKEN)
    assert per_gpu(m, "streamserver_model_loads_total") == {0: 0, 1: 1}
    assert per_gpu(m, "streamserver_model_unloads_total") == {0: 0, 1: 1}


def test_unknown_or_missing_gpu(base):
    for path, code in [("/models/load?gpu=7", 404), ("/models/unload?gpu=7", 404),
                       ("/models/load", 400), ("/models/load?gpu=x", 400)]:
        r = post(base, path)
        assert r.status_code == code and "error" in r.json(), (path, r.text)
    assert httpx.get(f"http://{base}/models/load?gpu=0&token={TOKEN}").status_code == 405


def test_unload_refuses_while_connections_use_the_models(base):
    ws = open_asr(base, f"token={TOKEN}")
    assert recv_json(ws)["gpu_id"] == 0
    wait_for(lambda: status(base)["gpus"][0]["models_loaded"])
    r = post(base, "/models/unload?gpu=0")
    assert r.status_code == 409 and "in use" in r.json()["error"]
    assert status(base)["gpus"][0]["models_loaded"] is True
    ws.close()
    wait_for(lambda: status(base)["total_connections"] == 0)
    wait_for(lambda: post(base, "/models/unload?gpu=0").json()["models_loaded"] is False)


def failing_loader(error: Exception):
    def load(device: Device):
        raise error
    return load


@pytest.mark.parametrize("error, code, prefix", [
    (RuntimeError("weights missing"), 500, "Model load failed on GPU 0"),
    (MemoryError("CUDA out of memory"), 507, "GPU memory full on GPU 0"),
])
def test_load_errors(error, code, prefix):
    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=failing_loader(error))
    with serve_app(app) as base:
        r = httpx.post(f"http://{base}/models/load?gpu=0")
    assert r.status_code == code and r.json()["error"].startswith(prefix)


# -- the CLI ----------------------------------------------------------------
def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(argv))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def test_status_prints_a_table(base, capsys):
    ws = open_asr(base, f"token={TOKEN}")
    recv_json(ws)
    wait_for(lambda: status(base)["gpus"][0]["models_loaded"])
    code, out, _ = run_cli(capsys, "status", "--url", f"http://{base}", "--token", TOKEN)
    ws.close()
    assert code == 0
    lines = out.splitlines()
    assert "2 simulated device(s), 1 connection(s), max 4 per device" in lines[0]
    header = lines[2].split()
    assert header[:4] == ["GPU", "DEVICE", "NAME", "CONNECTIONS"] and header[-1] == "MODELS"
    row0, row1 = lines[3], lines[4]
    assert row0.startswith("0") and "cuda:0" in row0 and "1/4" in row0 and "whisper:fake, vad:fake" in row0
    assert row1.startswith("1") and "0/4" in row1 and "/16.00" in row1 and row1.rstrip().endswith("-")


def test_models_commands(base, capsys):
    code, out, _ = run_cli(capsys, "models", "load", "--gpu", "1", "--url", f"http://{base}", "--token", TOKEN)
    assert (code, out.strip()) == (0, "GPU 1: models loaded (whisper:fake, vad:fake)")
    code, out, _ = run_cli(capsys, "models", "unload", "--gpu", "1", "--url", f"http://{base}", "--token", TOKEN)
    assert (code, out.strip()) == (0, "GPU 1: models unloaded")

    ws = open_asr(base, f"token={TOKEN}")
    recv_json(ws)
    wait_for(lambda: status(base)["gpus"][0]["models_loaded"])
    code, _, err = run_cli(capsys, "models", "unload", "--gpu", "0", "--url", f"http://{base}", "--token", TOKEN)
    ws.close()
    assert code == 1 and "HTTP 409" in err and "in use" in err


def test_cli_errors(base, capsys, monkeypatch):
    monkeypatch.delenv("STREAMSERVER_TOKEN", raising=False)
    monkeypatch.delenv("STREAMSERVER_API_TOKEN", raising=False)
    code, _, err = run_cli(capsys, "status", "--url", f"http://{base}")
    assert code == 1 and "HTTP 401" in err and "Unauthorized" in err
    code, _, err = run_cli(capsys, "models", "load", "--gpu", "9", "--url", f"http://{base}", "--token", TOKEN)
    assert code == 1 and "HTTP 404" in err
    code, _, err = run_cli(capsys, "status", "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 1 and "cannot reach" in err
    monkeypatch.setenv("STREAMSERVER_URL", f"http://{base}")
    monkeypatch.setenv("STREAMSERVER_TOKEN", TOKEN)
    assert run_cli(capsys, "status")[0] == 0


def test_the_streamserver_command_runs_status(base):
    out = subprocess.run([sys.executable, "-m", "streamserver", "status", "--url", f"http://{base}", "--token", TOKEN],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "GPU" in out.stdout and "cuda:1" in out.stdout
