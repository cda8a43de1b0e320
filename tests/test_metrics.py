"""`/metrics`: per-GPU figures follow connections, audio and inference; a real Prometheus scrapes them."""
from __future__ import annotations

import os
import subprocess
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from gpu_manager import GIB, Allocator, MemoryMonitor, discover
from streamserver.app import create_app
from streamserver.config import ServerConfig
from streamserver.ops.metrics import Metrics, RealtimeWindow
from streamserver.live.captions import CaptionState, Line
from streamserver.live.stream_meter import ArrivalLog
from tests.fakes import FakeNvml, fake_loader, tone
from tests.live import drain_until_closed, free_port, open_asr, recv_json, serve_app, wait_for
from tests.metrics_text import parse, per_gpu, scrape, value

PROMETHEUS = "/usr/bin/prometheus"


def active(base: str) -> dict[int, float]:
    return per_gpu(scrape(base), "streamserver_active_connections")


def test_connection_metrics_follow_connections_per_gpu():
    app = create_app(ServerConfig(pcm_input=True, max_connections_per_gpu=2), loader=fake_loader,
                     nvml_factory=lambda: FakeNvml(2, 16.0))
    with serve_app(app) as base:
        response = httpx.get(f"http://{base}/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=")
        m = parse(response.text)
        assert per_gpu(m, "streamserver_active_connections") == {0: 0, 1: 0}
        assert per_gpu(m, "streamserver_admissions_total") == {0: 0, 1: 0}
        assert per_gpu(m, "streamserver_model_loads_total") == {0: 0, 1: 0}
        for reason in ("full", "unauthorized", "origin", "draining"):
            assert ("streamserver_rejections_total", frozenset({("reason", reason)})) in m
        assert per_gpu(m, "streamserver_gpu_memory_total_bytes") == {0: 16 * GIB, 1: 16 * GIB}
        assert per_gpu(m, "streamserver_gpu_memory_used_bytes") == {0: 0.5 * GIB, 1: 0.5 * GIB}
        assert per_gpu(m, "streamserver_gpu_memory_free_bytes") == {0: 15.5 * GIB, 1: 15.5 * GIB}
        assert per_gpu(m, "streamserver_gpu_utilization_ratio") == {0: 0.125, 1: 0.125}

        sockets = []
        try:
            for expected_gpu, expected_active in [(0, {0: 1, 1: 0}), (1, {0: 1, 1: 1}), (0, {0: 2, 1: 1})]:
                ws = open_asr(base)
                assert recv_json(ws)["gpu_id"] == expected_gpu
                sockets.append(ws)
                assert active(base) == expected_active
            sockets.append(open_asr(base))
            recv_json(sockets[-1])
            refused = open_asr(base)
            with pytest.raises(ConnectionClosed):
                refused.recv(timeout=10)
            m = scrape(base)
            assert per_gpu(m, "streamserver_active_connections") == {0: 2, 1: 2}
            assert per_gpu(m, "streamserver_admissions_total") == {0: 2, 1: 2}
            assert value(m, "streamserver_rejections_total", reason="full") == 1
            wait_for(lambda: per_gpu(scrape(base), "streamserver_model_loads_total") == {0: 1, 1: 1})

            sockets.pop(0).close()  # gpu 0
            wait_for(lambda: active(base) == {0: 1, 1: 2})
            assert per_gpu(scrape(base), "streamserver_admissions_total") == {0: 2, 1: 2}
        finally:
            for ws in sockets:
                ws.close()
        wait_for(lambda: active(base) == {0: 0, 1: 0})


def test_audio_lag_batches_and_errors_are_recorded():
    app = create_app(ServerConfig(simulate_gpus="1x16", pcm_input=True), loader=fake_loader)
    with serve_app(app) as base:
        ws = open_asr(base)
        recv_json(ws)
        half = tone(0.5)
        for _ in range(8):  # one update per half second keeps steps apart, so words commit mid-stream
            ws.send(half)
            recv_json(ws)
        ws.send(b"")
        final = [m for m in drain_until_closed(ws) if "lines" in m][-1]
        assert final["lines"][0]["text"].startswith("w0")

        bad = open_asr(base)
        recv_json(bad)
        bad.send("not audio")
        drain_until_closed(bad)

        m = scrape(base)
    assert value(m, "streamserver_audio_received_seconds_total", gpu_id=0) == pytest.approx(4.0)
    assert value(m, "streamserver_audio_processed_seconds_total", gpu_id=0) == pytest.approx(4.0)
    assert value(m, "streamserver_caption_lag_seconds_count", gpu_id=0) >= 1
    assert value(m, "streamserver_realtime_factor", gpu_id=0) > 0
    for stage in ("vad", "encoder", "decoder"):
        batches = value(m, "streamserver_batch_size_count", gpu_id=0, stage=stage)
        assert batches >= 2  # the steps and the finish
        assert value(m, "streamserver_batch_size_sum", gpu_id=0, stage=stage) == batches  # one stream each
        assert value(m, "streamserver_queue_wait_seconds_count", gpu_id=0, stage=stage) == batches
    assert value(m, "streamserver_batch_size_count", gpu_id=0, stage="diarization") == 0
    assert value(m, "streamserver_connection_errors_total", gpu_id=0, code=1003) == 1
    assert value(m, "streamserver_model_load_seconds_count", gpu_id=0) == 1


def test_each_app_has_its_own_registry():
    one = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    two = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    one.state.server.metrics.admitted(0)
    first = parse(one.state.server.metrics.render()[0].decode())
    second = parse(two.state.server.metrics.render()[0].decode())
    assert value(first, "streamserver_admissions_total", gpu_id=0) == 1
    assert value(second, "streamserver_admissions_total", gpu_id=0) == 0


def test_realtime_factor_is_compute_over_audio_in_the_last_minute():
    now = [0.0]
    window = RealtimeWindow(60.0, clock=lambda: now[0])
    assert window.factor(0) == 0.0
    window.add(0, compute_seconds=1.0)
    window.add(0, audio_seconds=4.0)
    now[0] = 30.0
    window.add(0, compute_seconds=1.0, audio_seconds=4.0)
    assert window.factor(0) == pytest.approx(0.25)
    assert window.factor(1) == 0.0
    now[0] = 75.0  # the first two entries are over a minute old
    assert window.factor(0) == pytest.approx(0.25)
    now[0] = 91.0
    assert window.factor(0) == 0.0


def test_caption_lag_is_measured_from_the_arrival_of_the_committed_audio():
    now = [100.0]
    log = ArrivalLog(clock=lambda: now[0])
    log.received(1.0)
    now[0] = 101.0
    log.received(2.0)
    now[0] = 101.5
    log.received(3.0)
    now[0] = 102.5
    words = CaptionState(lines=(Line(1, "w0 w1", 0.0, 1.8),))
    assert log.lag_of(words) == pytest.approx(1.5)  # stream time 1.8 had arrived at 101.0
    assert log.lag_of(words) is None  # nothing newly committed
    silence = CaptionState(lines=(Line(1, "w0 w1", 0.0, 1.8), Line(-2, "", 1.8, 4.0)))
    assert log.lag_of(silence) is None  # a silence line commits no words
    beyond = CaptionState(lines=(Line(1, "w0 w1 w2", 0.0, 3.2),))
    assert log.lag_of(beyond) == pytest.approx(1.0)  # past what arrived: the latest arrival


def test_an_hour_of_silence_does_not_grow_the_stream_meter():
    """Arrivals are kept only while a commit can still be measured against them: a stream that hears
    nothing but silence for an hour (50 frames a second) holds a few, not 180,000."""
    from streamserver.live.stream_meter import StreamMeter

    meter = StreamMeter(Metrics(Allocator(discover(simulate="1x16").devices, 4), MemoryMonitor()), 0)
    for i in range(1, 3600 * 50 + 1):
        meter.audio_in(0.02, i * 0.02)
        if i % 10 == 0:  # a step every 0.2 s: everything received is processed, no speech
            meter.step_done(CaptionState(remaining_transcription=0.0), i * 0.02)
    assert len(meter.arrivals._marks) <= 2 * 50 * 2 + 10


@pytest.mark.skipif(not os.path.exists(PROMETHEUS), reason="prometheus is not installed (apt-get install prometheus)")
def test_a_real_prometheus_scrapes_per_gpu_connections(tmp_path):
    token = "scrape-token"
    app = create_app(ServerConfig(simulate_gpus="2x16", api_token=token), loader=fake_loader)
    with serve_app(app) as base:
        ws = open_asr(base, f"token={token}&format=pcm")
        assert recv_json(ws)["gpu_id"] == 0
        prom_port = free_port()
        (tmp_path / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: streamserver\n"
            f"    authorization:\n      type: Bearer\n      credentials: {token}\n"
            f"    static_configs:\n      - targets: ['{base}']\n"
        )
        prom = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        try:
            def scraped(query: str = "streamserver_active_connections") -> dict[str, float]:
                try:
                    r = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": query}, timeout=5)
                except httpx.HTTPError:
                    return {}
                if r.status_code != 200:
                    return {}
                return {s["metric"]["gpu_id"]: float(s["value"][1]) for s in r.json()["data"]["result"]}

            deadline = time.monotonic() + 90
            while scraped() != {"0": 1.0, "1": 0.0}:
                assert prom.poll() is None, prom.stderr.read()
                assert time.monotonic() < deadline, f"Prometheus never saw the connection: {scraped()}"
                time.sleep(0.5)
            # captions on GPU 0 give it caption-lag observations, which Prometheus then shows per GPU
            for _ in range(6):  # an update per half second, so words commit mid-stream
                ws.send(tone(0.5))
                recv_json(ws)
            ws.send(b"")
            drain_until_closed(ws)
            lag_count = "streamserver_caption_lag_seconds_count"
            while scraped(lag_count).get("0", 0.0) < 1.0:
                assert time.monotonic() < deadline, f"Prometheus never saw caption lag: {scraped(lag_count)}"
                time.sleep(0.5)
            assert scraped(lag_count)["1"] == 0.0
            assert scraped("streamserver_caption_lag_seconds_sum")["0"] >= 0.0
            up = httpx.get(f"http://127.0.0.1:{prom_port}/api/v1/query", params={"query": "up"}).json()
            assert [s["value"][1] for s in up["data"]["result"]] == ["1"]
        finally:
            prom.terminate()
            try:
                prom.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                prom.kill()
                prom.communicate()
            ws.close()
