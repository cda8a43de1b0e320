"""The live-caption page (`GET /`) in a real browser: Debian's Chromium, driven by Playwright.

Chromium's fake microphone plays an espeak-ng WAV (in a loop). The page streams it
to the real app with the real tiny.en weights, once as MediaRecorder webm/opus and
once as AudioWorklet PCM (`--pcm-input`), until the expected words are on screen;
then Stop, and the page must wait for `ready_to_stop` and the close. Other tests use
stand-in models: a full server, a server that wants a token, and the text shown for
every close the contract names, and a network drop the page resumes from (through
`tests/tcp_proxy.py`). Screenshots land in `test-artifacts/`.

Skipped without /usr/bin/chromium or the `playwright` package (CI installs both;
no browser is ever downloaded).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from streamserver.app import create_app
from streamserver.config import ServerConfig
from tests.fakes import fake_loader
from tests.live import gpu_status, open_asr, recv_json, serve_app

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
SPEECH = "And so my fellow Americans, ask not what your country can do for you."

if not Path(CHROMIUM).exists():
    pytest.skip(f"needs Debian's chromium at {CHROMIUM}", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package")


@pytest.fixture(scope="module")
def speech_wav(tmp_path_factory) -> Path:
    """The sentence as a 48 kHz mono 16-bit WAV, half a second of silence before and 1.5 s after."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    d = tmp_path_factory.mktemp("browser-speech")
    raw, wav = d / "raw.wav", d / "speech48k.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "140", "-w", str(raw), SPEECH], check=True)
    subprocess.run(["sox", str(raw), "-r", "48000", "-c", "1", "-b", "16", str(wav), "pad", "0.5", "1.5"], check=True)
    return wav


@pytest.fixture(scope="module")
def browser(speech_wav):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run",
            "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={speech_wav}",
        ])
        yield browser
        browser.close()


# Records every WebSocket.send() of the page: its kind, size and first bytes. (Chromium's
# devtools protocol does not report zero-length frames, so Playwright cannot show the end of stream.)
RECORD_SENDS = """
window.__sent = [];
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : ArrayBuffer.isView(data)
    ? new Uint8Array(data.buffer, data.byteOffset, data.byteLength) : null;
  window.__sent.push(bytes ? {kind: "binary", size: bytes.length, head: Array.from(bytes.slice(0, 4))}
                           : {kind: typeof data === "string" ? "text" : "blob", size: data.length || data.size});
  return realSend.call(this, data);
};
"""


class Tab:
    """A fresh browser context and page that records what the page sends on its sockets."""

    def __init__(self, browser, **context_options) -> None:
        self.context = browser.new_context(viewport={"width": 860, "height": 720}, permissions=["microphone"],
                                           **context_options)
        self.context.add_init_script(RECORD_SENDS)
        self.page = self.context.new_page()
        self.sockets: list[str] = []
        self.received: list[str] = []
        self.console: list[str] = []
        self.page.on("websocket", self._on_socket)
        self.page.on("console", lambda msg: self.console.append(f"{msg.type}: {msg.text}"))
        self.page.on("pageerror", lambda exc: self.console.append(f"pageerror: {exc}"))

    def _on_socket(self, ws) -> None:
        self.sockets.append(ws.url)
        ws.on("framereceived", lambda payload: self.received.append(payload))

    def sent(self) -> list[dict]:
        return self.page.evaluate("window.__sent")

    def state(self) -> str:
        return self.page.get_attribute("body", "data-state")

    def wait_state(self, state: str, timeout_s: float) -> None:
        try:
            self.page.wait_for_selector(f"body[data-state={state}]", timeout=timeout_s * 1000)
        except sync_api.TimeoutError:
            raise AssertionError(f"page never reached {state!r}; it is {self.state()!r}, status "
                                 f"{self.page.text_content('#status')!r}, notice "
                                 f"{self.page.text_content('#notice')!r}, console {self.console}") from None

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        print(f"screenshot: {path}")
        return path


@pytest.fixture
def tab(browser):
    tab = Tab(browser)
    yield tab
    tab.context.close()


def caption_text(tab: Tab) -> str:
    return tab.page.text_content("#captions") or ""


@pytest.mark.slow
@pytest.mark.parametrize("pcm_input", [False, True], ids=["webm-mediarecorder", "pcm-audioworklet"])
def test_speech_becomes_captions_in_the_page(tab, tmp_path_factory, pcm_input):
    cache = tmp_path_factory.getbasetemp() / "model-cache"  # shared with the other end-to-end tests
    app = create_app(ServerConfig(cache_dir=str(cache), pcm_input=pcm_input, idle_unload_seconds=0))
    with serve_app(app) as base:
        page = tab.page
        page.goto(f"http://{base}/")
        assert tab.state() == "idle"
        page.click("#start")
        try:
            page.wait_for_function(
                "document.querySelector('#captions').textContent.toLowerCase().includes('fellow americans')",
                timeout=60_000)
        except sync_api.TimeoutError:
            raise AssertionError(f"captions: {caption_text(tab)!r}; console: {tab.console}") from None
        assert tab.state() == "streaming"
        tab.screenshot("browser-" + ("pcm" if pcm_input else "webm") + "-live")
        assert page.text_content("#device") == "CPU · tiny.en"
        assert float(page.get_attribute("#level", "data-peak")) > 0.3  # the meter saw the speech

        page.click("#start")  # Stop
        tab.wait_state("finished", 60)
        shot = tab.screenshot("browser-" + ("pcm" if pcm_input else "webm"))

        # the last update is final: every word committed, nothing greyed
        final = caption_text(tab).lower()
        assert "fellow americans" in final
        assert page.query_selector_all(".buffer") == []
        lines = page.query_selector_all("#captions .line")
        assert lines and all(line.get_attribute("data-speaker") == "1" for line in lines)
        assert page.text_content("#captions .line .who") == "Speaker 1"
        assert page.text_content("#status").startswith("Finished.")  # (not "closed before confirming")
        assert page.is_hidden("#notice")
        assert json.loads(tab.received[-1]) == {"type": "ready_to_stop"}

        # what the page sent: binary audio frames in the server's format, then one empty frame
        assert tab.sockets == [f"ws://{base}/asr?updates=incremental"]  # only what changed: an hour stays light
        sent = tab.sent()
        assert {frame["kind"] for frame in sent} == {"binary"}
        assert sent[-1]["size"] == 0 and all(frame["size"] > 0 for frame in sent[:-1])
        if pcm_input:
            assert all(frame["size"] % 2 == 0 for frame in sent)  # s16le samples
            assert page.text_content("#format").startswith("16 kHz PCM")
        else:
            assert sent[0]["head"] == [0x1A, 0x45, 0xDF, 0xA3]  # webm (EBML) header
            assert page.text_content("#format").startswith("audio/webm")
    assert shot.stat().st_size > 10_000


def test_a_full_server_shows_the_busy_message(tab):
    app = create_app(ServerConfig(simulate_gpus="1x16", max_connections_per_gpu=1), loader=fake_loader)
    with serve_app(app) as base:
        holder = open_asr(base)
        try:
            assert recv_json(holder)["type"] == "config"  # the only slot is taken
            tab.page.goto(f"http://{base}/")
            tab.page.click("#start")
            tab.wait_state("failed", 20)
            assert tab.page.text_content("#notice") == "All GPUs are busy, try again shortly."
            assert tab.page.get_attribute("#notice", "class") == "notice warn"
            assert tab.page.is_hidden("#device")
            tab.screenshot("browser-busy")
        finally:
            holder.close()
        # the slot is free again: the same page gets in on its next Start
        tab.page.click("#start")
        tab.wait_state("streaming", 20)
        assert tab.page.is_hidden("#notice")
        assert tab.page.text_content("#device") == "GPU 0 · cuda:0 · tiny.en"
        tab.page.click("#start")
        tab.wait_state("finished", 20)


def test_over_https_the_page_uses_wss(browser, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    with serve_app(app, ssl_certfile=str(cert), ssl_keyfile=str(key)) as base:
        tab = Tab(browser, ignore_https_errors=True)
        try:
            tab.page.goto(f"https://{base}/")
            tab.page.click("#start")
            tab.wait_state("streaming", 20)
            assert tab.sockets == [f"wss://{base}/asr?updates=incremental"]
            tab.page.click("#start")
            tab.wait_state("finished", 20)
        finally:
            tab.context.close()


def test_the_viewer_link_shows_the_speakers_captions_live_in_another_tab(browser, tab):
    """The speaker's page offers its stream's viewer link; opened in another tab (no microphone), it
    shows the same caption lines as they form and says when the stream has ended."""
    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    with serve_app(app) as base:
        speaker = tab.page
        speaker.goto(f"http://{base}/")
        speaker.click("#start")
        tab.wait_state("streaming", 20)
        speaker.wait_for_selector("#share:not([hidden])", timeout=10_000)
        link = speaker.get_attribute("#share", "href")
        assert link.startswith(f"http://{base}/watch/")
        viewer = Tab(browser)
        try:
            viewer.page.goto(link)
            viewer.wait_state("streaming", 20)
            assert gpu_status(base)["viewers"] == 1 and gpu_status(base)["active_connections"] == 1
            viewer.page.wait_for_selector("#captions .line", timeout=30_000)  # captions while it streams
            assert tab.state() == "streaming"
            speaker.click("#start")  # Stop
            tab.wait_state("finished", 30)
            viewer.wait_state("finished", 30)
            viewer.screenshot("browser-viewer")
            said = [t.strip() for t in speaker.locator("#captions .line .text").all_text_contents()]
            seen = [t.strip() for t in viewer.page.locator("#captions .line .text").all_text_contents()]
            assert said and seen == said
            assert viewer.page.text_content("#status").startswith("The stream has ended.")
            assert viewer.sockets[0].startswith(f"ws://{base}/asr/watch/")
            assert viewer.console == []
        finally:
            viewer.context.close()


def test_the_page_asks_for_a_token_and_remembers_it(tab):
    app = create_app(ServerConfig(simulate_gpus="1x16", api_token="s3cret"), loader=fake_loader)
    with serve_app(app) as base:
        page = tab.page
        assert httpx.get(f"http://{base}/").status_code == 200  # the page itself needs no token
        page.goto(f"http://{base}/")
        assert page.is_hidden("#token-form")
        page.click("#start")
        tab.wait_state("failed", 20)
        assert "needs an access token" in page.text_content("#notice")
        assert page.is_visible("#token")

        page.fill("#token", "wrong")
        page.click("#start")
        tab.wait_state("failed", 20)
        assert "did not accept this access token" in page.text_content("#notice")

        page.fill("#token", "s3cret")
        page.press("#token", "Enter")
        tab.wait_state("streaming", 20)
        assert tab.sockets[-1] == f"ws://{base}/asr?updates=incremental&token=s3cret"
        page.click("#start")
        tab.wait_state("finished", 20)

        page.reload()  # a later visit has the token filled in
        assert page.is_visible("#token") and page.input_value("#token") == "s3cret"


CLOSES = [
    (1008, "No GPU resources available", None, "All GPUs are busy, try again shortly."),
    (1008, "Unauthorized", None, "This server needs an access token. Enter it below and press Start."),
    (1008, "Origin not allowed", None, "does not accept connections from http://"),
    (1001, "Server is draining", None, "The server is restarting and not taking new streams."),
    (1001, "Server shutting down", None, "The server is shutting down."),
    (1003, "Expected binary audio frames", "Expected binary audio frames", "expected audio frames"),
    (1007, "Audio decode error: invalid data at byte 0", "Audio decode error: invalid data at byte 0",
     "could not decode this browser's audio (Audio decode error: invalid data at byte 0)"),
    (1009, "Frame too large: 2000000 bytes (limit 1048576)", "Frame too large: 2000000 bytes (limit 1048576)",
     "too large for the server (Frame too large: 2000000 bytes (limit 1048576))"),
    (1011, "GPU memory full on GPU 2", "GPU memory full on GPU 2: CUDA out of memory", "GPU 2 ran out of memory."),
    (1011, "Model load failed on GPU 1", "Model load failed on GPU 1", "could not be loaded on GPU 1."),
    (1011, "Internal server error", "Internal server error", "internal error"),
    (1008, "Unsupported format 'x' (use pcm, webm, ogg or auto)", None, "refused the connection: Unsupported format"),
    (1006, "", None, "Lost the connection to the server."),
]


def test_every_close_the_contract_names_has_a_clear_message(tab):
    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    with serve_app(app) as base:
        tab.page.goto(f"http://{base}/")
        for code, reason, error, expected in CLOSES:
            shown = tab.page.evaluate(
                f"window.streamserverPage.closeMessage({code}, {json.dumps(reason)}, {json.dumps(error)}, false)")
            assert expected in shown["text"], (code, reason, shown)
            assert shown["kind"] in ("warn", "error")


DIARIZED_UPDATE = {
    "status": "active_transcription",
    "lines": [
        {"speaker": -2, "text": "", "start": "0:00:00.00", "end": "0:00:02.40", "start_s": 0.0, "end_s": 2.4},
        {"speaker": 1, "text": "Good morning, shall we start with the budget?",
         "start": "0:00:02.40", "end": "0:00:05.10", "start_s": 2.4, "end_s": 5.1},
        {"speaker": 2, "text": "Yes, the numbers came in yesterday.",
         "start": "0:00:05.30", "end": "0:00:07.90", "start_s": 5.3, "end_s": 7.9},
        {"speaker": -2, "text": "", "start": "0:00:07.90", "end": "0:00:10.20", "start_s": 7.9, "end_s": 10.2},
        {"speaker": 1, "text": "Great.", "start": "0:00:10.20", "end": "0:00:10.80", "start_s": 10.2, "end_s": 10.8},
    ],
    "buffer_diarization": "Let's go through",
    "buffer_transcription": "them one by one",
    "buffer_translation": "",
    "remaining_time_transcription": 0.6,
    "remaining_time_diarization": 1.2,
}


def test_speakers_silences_and_pending_words_are_drawn_apart(tab):
    app = create_app(ServerConfig(simulate_gpus="1x16"), loader=fake_loader)
    with serve_app(app) as base:
        page = tab.page
        page.goto(f"http://{base}/")
        page.evaluate("update => window.streamserverPage.render(update)", DIARIZED_UPDATE)
        rows = page.query_selector_all("#captions > *")
        assert [r.get_attribute("class") for r in rows] == ["gap", "line", "line", "gap", "line"]
        assert [r.get_attribute("data-speaker") for r in rows] == [None, "1", "2", None, "1"]
        assert rows[0].text_content() == "silence 2.4 s00:00.00 – 00:02.40"
        assert rows[2].query_selector(".who").text_content() == "Speaker 2"
        assert rows[2].query_selector(".when").text_content() == "00:05.30 – 00:07.90"
        colors = [r.evaluate("e => getComputedStyle(e.querySelector('.who')).color") for r in rows[1:3]]
        assert colors[0] != colors[1]
        assert rows[4].query_selector(".text").text_content() == "Great. Let's go through them one by one"
        assert rows[4].query_selector(".buffer-diarization").text_content() == " Let's go through"
        assert rows[4].query_selector(".buffer-transcription").text_content() == " them one by one"
        assert page.text_content("#lag") == "transcription 0.6 s behind · speakers 1.2 s behind"
        tab.screenshot("browser-speakers")
        page.set_viewport_size({"width": 390, "height": 760})  # a phone: nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        tab.screenshot("browser-speakers-phone")
        page.emulate_media(color_scheme="dark")
        tab.screenshot("browser-speakers-phone-dark")

        # the next update: the pending words are committed, the buffers are gone
        final = dict(DIARIZED_UPDATE, buffer_diarization="", buffer_transcription="",
                     remaining_time_transcription=0.0, remaining_time_diarization=0.0)
        final["lines"] = [*DIARIZED_UPDATE["lines"][:4], dict(
            DIARIZED_UPDATE["lines"][4], text="Great. Let's go through them one by one.", end="0:00:12.00", end_s=12.0)]
        page.evaluate("update => window.streamserverPage.render(update)", final)
        assert page.query_selector_all(".buffer") == []
        assert page.text_content("#captions .line:last-child .text") == "Great. Let's go through them one by one."
        assert page.text_content("#lag") == ""


def test_the_page_resumes_its_stream_after_the_network_drops(tab):
    """The network goes mid-stream (every TCP connection reset) and stays down for a few seconds:
    the page keeps recording, says it is reconnecting, comes back to the same session (its slot
    held meanwhile), keeps the captions it had, and finishes normally."""
    from tests.tcp_proxy import TcpProxy

    app = create_app(ServerConfig(simulate_gpus="1x16", resume_seconds=30), loader=fake_loader)
    with serve_app(app) as base:
        proxy = TcpProxy(base)
        try:
            page = tab.page
            page.goto(f"http://{proxy.address}/")
            page.click("#start")
            tab.wait_state("streaming", 20)
            page.wait_for_function("document.querySelectorAll('#captions .line .text').length > 0 && "
                                   "document.querySelector('#captions .line .text').textContent.trim() !== ''",
                                   timeout=30_000)
            session = page.get_attribute("#device", "title")
            assert session.startswith("connection ")
            first_line = page.text_content("#captions .line .text").strip()

            proxy.down = True
            proxy.cut()
            tab.wait_state("connecting", 10)
            assert page.text_content("#notice") == "Connection lost. Reconnecting…"
            page.wait_for_timeout(3000)  # down for 3 s: the page retries and is reset each time
            held = gpu_status(base)
            assert held["held_for_resume"] == 1 and held["active_connections"] == 0  # the slot waits for it, held
            assert first_line in caption_text(tab)  # what it had is still on screen

            proxy.down = False
            tab.wait_state("streaming", 20)
            assert page.text_content("#status") == "Reconnected. Listening."
            assert page.is_hidden("#notice")
            assert page.get_attribute("#device", "title") == session  # the same session, not a new one
            assert gpu_status(base)["held_for_resume"] == 0
            resumed = [url for url in tab.sockets if "resume=" in url]
            assert tab.sockets[0] == f"ws://{proxy.address}/asr?updates=incremental" and resumed
            assert len(resumed) >= 3  # at least two refused while down, then the one that got through

            shown = len(caption_text(tab))
            page.wait_for_function(f"document.querySelector('#captions').textContent.length > {shown}",
                                   timeout=30_000)  # captions go on after the resume
            page.click("#start")  # Stop
            tab.wait_state("finished", 30)
            assert page.text_content("#status").startswith("Finished.")
            final = page.text_content("#captions .line .text").strip()
            assert final.startswith(first_line)
            assert json.loads(tab.received[-1]) == {"type": "ready_to_stop"}
            status = gpu_status(base)
            assert status["active_connections"] == 0 and status["held_for_resume"] == 0
        finally:
            proxy.close()
