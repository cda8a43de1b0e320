"""Hostile clients at the edge, against a real server process over raw sockets: every oversized or
stalled request gets its status code and its connection back, and an upload over the limit is not
written out before it is refused."""
from __future__ import annotations

import os
import socket
import time

import pytest

from tests.live import start_server_process

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    db = folder / "jobs.sqlite"
    log = open(folder / "server.log", "w")
    proc, base = start_server_process(
        ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--request-timeout", "1.5", "--max-upload-mb", "1",
         "--jobs-db", str(db)], stdout=log)
    host, port = base.split(":")
    yield host, int(port), folder
    proc.terminate()
    proc.wait(30)
    log.close()


def _exchange(server, request: bytes, wait: float = 15.0) -> tuple[bytes, float]:
    """Send `request`, read until the server closes; (what came back, seconds it took)."""
    host, port, _ = server
    started = time.monotonic()
    with socket.create_connection((host, port), timeout=wait) as s:
        if request:
            s.sendall(request)
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return data, time.monotonic() - started


def _status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    return int(data.split()[1])


def test_a_websocket_upgrade_with_an_8_kb_url_gets_414(server):
    request = (f"GET /asr?x={'a' * 8200} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()
    data, _ = _exchange(server, request)
    assert _status(data) == 414


def test_a_header_block_over_64_kb_gets_431(server):
    data, _ = _exchange(server, f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {'a' * 70000}\r\n\r\n".encode())
    assert _status(data) == 431


def test_a_request_head_that_stops_half_way_gets_408_and_is_closed(server):
    data, took = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\n")
    assert _status(data) == 408 and took < 14  # the timeout (1.5 s), not the client's patience


def test_a_connection_that_sends_nothing_is_closed(server):
    data, took = _exchange(server, b"")
    assert _status(data) == 408 and took < 14


def test_a_body_shorter_than_its_content_length_gets_408(server):
    head = (b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n")
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
    data, took = _exchange(server, head + body)
    assert _status(data) == 408 and took < 14


def test_a_slow_body_that_keeps_coming_is_not_cut(server):
    host, port, _ = server
    body = b"x" * 10
    with socket.create_connection((host, port), timeout=15) as s:
        s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        for i in range(10):  # 2 s in all, longer than the timeout, a byte every 0.2 s
            s.sendall(body[i:i + 1])
            time.sleep(0.2)
        data = s.recv(65536)
    assert _status(data) == 405  # the request arrived whole (and /health takes no POST)


def test_a_chunked_upload_over_the_limit_is_refused_before_it_is_written(server):
    host, port, folder = server
    files = folder / "jobs.sqlite.files"
    before = {p: p.stat().st_size for p in files.glob("*")} if files.exists() else {}
    part = (b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
            b"Content-Type: audio/wav\r\n\r\n")
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        block = os.urandom(256 * 1024)
        answer = b""
        sent = 0
        for _ in range(40):  # up to 10 MB, ten times the limit: the server answers long before
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += 1
            except (BrokenPipeError, ConnectionResetError):
                break
            s.settimeout(0.05)
            try:
                answer += s.recv(65536)
            except socket.timeout:
                pass
            s.settimeout(30)
            if answer:
                break
        if not answer:
            answer = s.recv(65536)
    assert _status(answer) == 413 and sent < 40  # refused while the upload was still coming
    after = {p: p.stat().st_size for p in files.glob("*")} if files.exists() else {}
    assert all(size <= 2 * 2**20 for p, size in after.items() if p not in before)  # nothing past the limit
