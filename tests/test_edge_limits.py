"""Hostile clients at the edge, against a real server process over raw sockets: every oversized or
stalled request gets its status code and its connection back, an upload over the limit is refused
while it arrives and leaves nothing behind, and nothing that is merely slow or quiet is cut (a body
that keeps coming, an answer that takes longer than the timeout, an idle WebSocket stream)."""
from __future__ import annotations

import asyncio
import io
import json
import os
import select
import socket
import time
import wave

import numpy as np
import pytest

from tests.live import drain_until_closed, open_asr, recv_json, start_server_process, wait_for

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
UPGRADE = f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n"
TIMEOUT = 1.5  # --request-timeout of the server under test
SLOW_ASR = 2.0  # each transcription takes this long: longer than the timeout
LIMIT = 2**20  # --max-upload-mb 1
PATIENCE = 15.0  # how long a test waits for an answer: a bound, far above the timeout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edge")
    log = open(folder / "server.log", "w")
    proc, base = start_server_process(
        ["-m", "tests.fake_server", "--simulate-gpus", "1x16", "--request-timeout", str(TIMEOUT),
         "--max-upload-mb", "1", "--jobs-db", str(folder / "jobs.sqlite")],
        stdout=log, env=dict(os.environ, FAKE_ASR_SECONDS=str(SLOW_ASR)))
    host, port = base.split(":")
    yield host, int(port), folder / "jobs.sqlite.files"
    proc.terminate()
    proc.wait(30)
    log.close()


def _connect(server) -> socket.socket:
    host, port, _ = server
    return socket.create_connection((host, port), timeout=PATIENCE)


def _read_until_closed(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (failing if it does not close)."""
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except socket.timeout:
        pytest.fail(f"the server did not close the connection within {PATIENCE} s; it sent {data[:80]!r}")
    except ConnectionResetError:
        pass
    return data


def _exchange(server, request: bytes) -> bytes:
    """Send `request`, read until the server closes the connection; what came back."""
    with _connect(server) as s:
        if request:
            s.sendall(request)
        return _read_until_closed(s)


def _status(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:80]
    return int(data.split()[1])


def _error(data: bytes) -> str:
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    return json.loads(body)["error"]


def _files(folder) -> dict:
    return {p.name: p.stat().st_size for p in folder.glob("*")} if folder.exists() else {}


# --- sizes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("upgrade", [True, False], ids=["websocket", "http"])
def test_an_8_kb_url_gets_414(server, upgrade):
    path = "/asr" if upgrade else "/health"
    data = _exchange(server, f"GET {path}?x={'a' * 8200} HTTP/1.1\r\nHost: x\r\n"
                             f"{UPGRADE if upgrade else ''}\r\n".encode())
    assert _status(data) == 414 and _error(data) == "Request URL too long"


@pytest.mark.parametrize("upgrade", [True, False], ids=["websocket", "http"])
@pytest.mark.parametrize("headers", [
    "X-Big: " + "a" * 70_000 + "\r\n",  # one header past the whole head's 64 KB
    "X-Long: " + "a" * 9_000 + "\r\n",  # one header line past 8 KB
    "".join(f"X-H{i}: v\r\n" for i in range(150)),  # more than 100 fields
], ids=["70kb-header", "9kb-line", "150-headers"])
def test_oversized_headers_get_431(server, upgrade, headers):
    path = "/asr" if upgrade else "/health"
    data = _exchange(server, f"GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE if upgrade else ''}{headers}\r\n".encode())
    assert _status(data) == 431 and _error(data) == "Request header fields too large"


def test_a_head_of_megabytes_gets_its_431_not_a_reset(server):
    """Refused after 64 KB while 4 MB more are on their way: the answer is written, and what the client
    still sends is read and dropped, so no reset destroys the answer before the client reads it."""
    with _connect(server) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (4 * 2**20) + b"\r\n\r\n")
        data = _read_until_closed(s)
    assert _status(data) == 431


def test_a_url_and_headers_within_the_limits_are_served(server):
    many = "".join(f"X-H{i}: v\r\n" for i in range(90))
    data = _exchange(server, f"GET /health?x={'a' * 7000} HTTP/1.1\r\nHost: x\r\nX-Long: {'b' * 7000}\r\n"
                             f"{many}Connection: close\r\n\r\n".encode())
    assert _status(data) == 200


# --- time ------------------------------------------------------------------------------------------

def test_a_request_head_that_stops_half_way_gets_408_and_is_closed(server):
    data = _exchange(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Par")
    assert _status(data) == 408 and _error(data) == "Request head not received in time"


def test_a_connection_that_sends_nothing_is_closed(server):
    assert _exchange(server, b"") == b""  # closed, with no answer to a request that never began


def test_a_body_shorter_than_its_content_length_gets_408_and_leaves_no_file(server):
    _, _, folder = server
    before = _files(folder)
    head = (b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000\r\n\r\n")
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF'
    data = _exchange(server, head + body)
    assert _status(data) == 408 and _error(data) == "Request body stalled"
    wait_for(lambda: _files(folder).keys() <= before.keys())  # the half upload was removed


def test_a_slow_body_that_keeps_coming_is_not_cut(server):
    body = _form(b"not audio at all" * 4)
    with _connect(server) as s:
        s.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: %d\r\n\r\n" % len(body))
        step = len(body) // 10 + 1
        for i in range(0, len(body), step):  # 2 s in all, longer than the timeout: a piece every 0.2 s
            s.sendall(body[i:i + step])
            time.sleep(0.2)
        data = _read_until_closed(s)
    assert _status(data) == 400 and "not a decodable audio file" in _error(data)  # it all arrived, and was read


def _read_response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length (the connection stays open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")))
    while len(body) < length:
        body += s.recv(65536) or pytest.fail(f"closed mid-response: {data!r}")
    return head + b"\r\n\r\n" + body


def test_a_kept_alive_connection_serves_a_second_request_after_a_pause(server):
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with _connect(server) as s:
        s.sendall(request)
        first = _read_response(s)
        time.sleep(TIMEOUT * 0.7)
        s.sendall(request)
        second = _read_response(s)
    assert _status(first) == 200 and _status(second) == 200


def _tone_wav(seconds: float) -> bytes:
    t = np.arange(int(seconds * 16000)) / 16000
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2").tobytes())
    return out.getvalue()


def _form(audio: bytes, **fields: str) -> bytes:
    parts = [f'--b\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(b'--b\r\nContent-Disposition: form-data; name="file"; filename="tone.wav"\r\n'
                 b"Content-Type: audio/wav\r\n\r\n" + audio + b"\r\n--b--\r\n")
    return b"".join(parts)


def test_an_answer_that_takes_longer_than_the_timeout_is_not_cut(server):
    """A chunked upload (no Content-Length) under the limit, transcribed in more than the timeout."""
    body = _form(_tone_wav(2.0), response_format="text", language="en")
    with _connect(server) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(0, len(body), 16384):
            piece = body[i:i + 16384]
            s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        s.sendall(b"0\r\n\r\n")
        started = time.monotonic()
        data = _read_until_closed(s)
    assert _status(data) == 200, data[-200:]
    assert data.partition(b"\r\n\r\n")[2].strip()  # the stand-in's words for the tone
    assert time.monotonic() - started >= SLOW_ASR  # it did take longer than the timeout


def test_an_idle_websocket_stream_is_not_cut(server):
    host, port, _ = server
    ws = open_asr(f"{host}:{port}")
    try:
        assert recv_json(ws)["type"] == "config"
        time.sleep(TIMEOUT * 2.5)  # quiet for longer than the timeout: the stream is not an HTTP request
        ws.send(b"")  # end of stream
        messages = drain_until_closed(ws, timeout=PATIENCE)
    finally:
        ws.close()
    assert messages[-1] == {"type": "ready_to_stop"}


# --- uploads ---------------------------------------------------------------------------------------

def test_a_chunked_upload_over_the_limit_is_refused_as_soon_as_it_passes_it(server):
    """1.25 MB of a chunked upload, then the client waits without ending it: a server that read to the
    end before refusing would answer nothing here (then 408 for the stalled body); this one counts the
    bytes as they come and answers 413 at the limit, having written nothing past it and kept nothing."""
    _, _, folder = server
    before = _files(folder)
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\nContent-Type: audio/wav\r\n\r\n'
    block = os.urandom(256 * 1024)
    with _connect(server) as s:
        s.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        for _ in range(5):
            s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
        answer = _read_until_closed(s)
    assert _status(answer) == 413 and "--max-upload-mb" in _error(answer)
    new = {name: size for name, size in _files(folder).items() if name not in before}
    assert all(size <= LIMIT for size in new.values())  # never written past the limit
    wait_for(lambda: _files(folder).keys() <= before.keys())  # and removed


def test_a_chunked_upload_of_ten_times_the_limit_is_answered_before_it_ends(server):
    block = os.urandom(256 * 1024)
    sent, answered = 0, False
    with _connect(server) as s:
        s.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n")
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        try:
            while sent < 40 * len(block) and not answered:
                s.sendall(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                answered = bool(select.select([s], [], [], 0)[0])
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _read_until_closed(s)
    assert _status(answer) == 413
    assert sent < 40 * len(block)  # the answer came while the upload was still being sent


# --- the cause of the 414 that never arrived -------------------------------------------------------

def test_a_handshake_that_websockets_rejects_is_written_and_closed():
    """uvicorn 0.50-0.51 (websockets' sans-I/O protocol by default) with websockets >= 17: websockets
    queues a 414/431 for a handshake over its limits and logs "HTTP response sent", but uvicorn only ever
    looked at parser errors, so the answer was never written nor the connection closed. Driven here
    the way those versions drive it: bytes in, then `handle_events()`."""
    from uvicorn.config import Config
    from uvicorn.server import ServerState

    from streamserver import edge

    if edge.EdgeWebSocketProtocol is None:
        pytest.skip("uvicorn without the websockets sans-I/O protocol")

    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.out, self.eof, self.closed = b"", False, False

        def write(self, data) -> None:
            self.out += bytes(data)

        def can_write_eof(self) -> bool:
            return True

        def write_eof(self) -> None:
            self.eof = True

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def is_reading(self) -> bool:
            return True

        def get_extra_info(self, name, default=None):
            return {"peername": ("127.0.0.1", 50000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    async def app(scope, receive, send):  # never reached
        raise AssertionError("the app saw a rejected handshake")

    async def handshake(request: bytes) -> Transport:
        config = Config(app, log_config=None)
        config.load()
        protocol = edge.EdgeWebSocketProtocol(config=config, server_state=ServerState(), app_state={})
        transport = Transport()
        protocol.connection_made(transport)
        protocol.conn.receive_data(request)
        protocol.handle_events()
        return transport

    import websockets

    long_url = asyncio.run(handshake(f"GET /asr?x={'a' * 9000} HTTP/1.1\r\nHost: x\r\n{UPGRADE}\r\n".encode()))
    # websockets >= 17 queues its own 414; older ones queue nothing and the edge answers 400 itself.
    expected = b"HTTP/1.1 414" if int(websockets.__version__.split(".")[0]) >= 17 else b"HTTP/1.1 400"
    assert long_url.out.startswith(expected) and long_url.eof
    garbage = asyncio.run(handshake(f"GET /asr HTTP/1.1\r\nHost: x\r\n{UPGRADE}Bad Header\r\n\r\n".encode()))
    assert garbage.out.startswith(b"HTTP/1.1 4") and garbage.eof
