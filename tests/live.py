"""Run the real app under uvicorn on a free loopback port, in a background thread."""
from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import uvicorn
from websockets.sync.client import ClientConnection, connect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(app, ws_max_size: int = 16 * 2**20, **uvicorn_options) -> Iterator[str]:
    """Yields the base URL (`127.0.0.1:PORT`) while uvicorn serves `app` (`uvicorn_options`: e.g. TLS files)."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", ws_max_size=ws_max_size,
                            lifespan="on", **uvicorn_options)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def open_asr(base: str, query: str = "") -> ClientConnection:
    return connect(f"ws://{base}/asr" + (f"?{query}" if query else ""), open_timeout=10, max_size=None)


def recv_json(ws: ClientConnection, timeout: float = 30) -> dict:
    return json.loads(ws.recv(timeout=timeout))


def drain_until_closed(ws: ClientConnection, timeout: float = 60) -> list[dict]:
    """Every message until the server closes; returns them parsed."""
    from websockets.exceptions import ConnectionClosed

    out = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            out.append(json.loads(ws.recv(timeout=max(0.1, deadline - time.monotonic()))))
    except ConnectionClosed:
        return out
    raise TimeoutError("server did not close the connection")


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Poll until `predicate()` is true; fail after `timeout` seconds (a bound, not a measurement)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def gpu_status(base: str, gpu: int = 0) -> dict:
    """One device's entry of `/gpu-status`."""
    return httpx.get(f"http://{base}/gpu-status").json()["gpus"][gpu]


def start_server_process(argv: list[str], **popen) -> tuple[subprocess.Popen, str]:
    """Start `python <argv> --port P` and wait until its /health answers; returns (process, base URL)."""
    port = free_port()
    popen.setdefault("stdout", subprocess.PIPE)  # or a file: a chatty server never fills a pipe nobody reads
    proc = subprocess.Popen([sys.executable, *argv, "--port", str(port)], stderr=subprocess.STDOUT, text=True,
                            **popen)
    base = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.1)
