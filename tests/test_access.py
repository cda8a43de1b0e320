"""Access control and readiness: the token, the allowed origins, `/ready`, and the order of the checks."""
from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader
from tests.live import open_asr, recv_json, serve_app, wait_for
from tests.metrics_text import scrape, value

TOKEN = "s3cret-token"
GOOD_ORIGIN = "https://captions.example"


@pytest.fixture(scope="module")
def guarded():
    """A server with a token and an origin list; yields (base URL, its Server object)."""
    config = ServerConfig(simulate_gpus="2x16", api_token=TOKEN, allowed_origins=(GOOD_ORIGIN,))
    app = create_app(config, loader=fake_loader)
    with serve_app(app) as base:
        yield base, app.state.server


def refusal(ws) -> tuple[int, str]:
    """The close code and reason of a socket the server refused (no message may come first)."""
    with pytest.raises(ConnectionClosed) as closed:
        message = ws.recv(timeout=10)
        pytest.fail(f"a refused socket was sent {message!r}")
    return closed.value.rcvd.code, closed.value.rcvd.reason


def asr(base: str, query: str = "", **kwargs):
    return connect(f"ws://{base}/asr" + (f"?{query}" if query else ""), open_timeout=10, **kwargs)


@pytest.mark.parametrize("query, headers", [
    ("", {}),
    ("token=wrong", {}),
    ("", {"Authorization": "Bearer wrong"}),
    ("", {"Authorization": f"Basic {TOKEN}"}),
], ids=["none", "wrong-query", "wrong-header", "not-bearer"])
def test_a_socket_without_the_right_token_is_refused_before_admission(guarded, query, headers):
    base, _ = guarded
    before = value(scrape(base, TOKEN), "streamserver_rejections_total", reason="unauthorized")
    assert refusal(asr(base, query, additional_headers=headers)) == (1008, "Unauthorized")
    assert value(scrape(base, TOKEN), "streamserver_rejections_total", reason="unauthorized") == before + 1


@pytest.mark.parametrize("query, headers", [
    (f"token={TOKEN}", {}),
    ("", {"Authorization": f"Bearer {TOKEN}"}),
    ("", {"authorization": f"bearer {TOKEN}"}),
], ids=["query", "header", "header-lower-case"])
def test_the_right_token_is_admitted(guarded, query, headers):
    base, _ = guarded
    with asr(base, query, additional_headers=headers) as ws:
        assert recv_json(ws)["type"] == "config"


def test_no_model_work_for_unauthorized_sockets():
    app = create_app(ServerConfig(simulate_gpus="1x16", api_token=TOKEN), loader=fake_loader)
    with serve_app(app) as base:
        assert refusal(open_asr(base)) == (1008, "Unauthorized")
        m = scrape(base, TOKEN)
    assert value(m, "streamserver_admissions_total", gpu_id=0) == 0
    assert value(m, "streamserver_model_loads_total", gpu_id=0) == 0
    assert app.state.server.runtimes[0].models is None


@pytest.mark.parametrize("method, path", [
    ("GET", "/gpu-status"), ("GET", "/metrics"), ("POST", "/models/load?gpu=0"), ("POST", "/models/unload?gpu=0"),
])
def test_admin_endpoints_need_the_token(guarded, method, path):
    base, _ = guarded
    url = f"http://{base}{path}"
    with_token = url + ("&" if "?" in url else "?") + "token="
    for headers, target in [({}, url), ({"Authorization": "Bearer wrong"}, url), ({}, with_token + "wrong")]:
        r = httpx.request(method, target, headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    assert httpx.request(method, url, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert httpx.request(method, with_token + TOKEN).status_code == 200


def test_health_and_ready_never_need_the_token(guarded):
    base, _ = guarded
    assert httpx.get(f"http://{base}/health").json() == {"status": "ok"}
    r = httpx.get(f"http://{base}/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_origins(guarded):
    base, _ = guarded
    assert refusal(asr(base, f"token={TOKEN}", origin="https://evil.example")) == (1008, "Origin not allowed")
    with asr(base, f"token={TOKEN}", origin=GOOD_ORIGIN) as ws:
        assert recv_json(ws)["type"] == "config"
    with asr(base, f"token={TOKEN}") as ws:  # no Origin header: not a browser
        assert recv_json(ws)["type"] == "config"
    assert value(scrape(base, TOKEN), "streamserver_rejections_total", reason="origin") >= 1


def test_checks_run_in_the_contract_order():
    """origin, token, draining, capacity."""
    config = ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=1, api_token=TOKEN,
                          allowed_origins=(GOOD_ORIGIN,))
    app = create_app(config, loader=fake_loader)
    server = app.state.server
    with serve_app(app) as base:
        holder = asr(base, f"token={TOKEN}")  # fills the only slot
        recv_json(holder)
        assert refusal(asr(base, origin="https://evil.example")) == (1008, "Origin not allowed")
        assert refusal(asr(base, "token=wrong")) == (1008, "Unauthorized")
        assert refusal(asr(base, f"token={TOKEN}")) == (1008, "No GPU resources available")
        server.drain.draining = True  # as SIGTERM does (tests/test_drain.py sends the real signal)
        assert refusal(asr(base, "token=wrong")) == (1008, "Unauthorized")
        assert refusal(asr(base, f"token={TOKEN}")) == (1001, "Server is draining")
        m = scrape(base, TOKEN)
        holder.close()
    for reason in ("origin", "full", "draining"):
        assert value(m, "streamserver_rejections_total", reason=reason) == 1
    assert value(m, "streamserver_rejections_total", reason="unauthorized") == 2


def test_ready_flips_at_full_capacity_and_when_draining():
    app = create_app(ServerConfig(simulate_gpus="2x16", max_connections_per_gpu=1), loader=fake_loader)
    with serve_app(app) as base:
        def ready() -> tuple[int, dict]:
            r = httpx.get(f"http://{base}/ready")
            return r.status_code, r.json()

        assert ready() == (200, {"ready": True, "free_slots": 2, "total_slots": 2})
        first, second = open_asr(base), open_asr(base)
        recv_json(first), recv_json(second)
        assert ready() == (503, {"ready": False, "reason": "full", "free_slots": 0, "total_slots": 2})
        first.close()
        wait_for(lambda: ready()[0] == 200)
        assert ready() == (200, {"ready": True, "free_slots": 1, "total_slots": 2})
        gpus = httpx.get(f"http://{base}/gpu-status").json()["gpus"]
        assert sorted(g["free_slots"] for g in gpus) == [0, 1]  # the room, device by device
        m = scrape(base)
        assert sorted(value(m, "streamserver_free_slots", gpu_id=str(g)) for g in (0, 1)) == [0, 1]
        assert value(m, "streamserver_max_connections", gpu_id="0") == 1
        app.state.server.drain.draining = True
        assert ready() == (503, {"ready": False, "reason": "draining", "free_slots": 0, "total_slots": 2})
        assert httpx.get(f"http://{base}/gpu-status").json()["draining"] is True
        second.close()
