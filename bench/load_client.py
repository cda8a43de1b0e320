"""Load client: N concurrent streams of one file at real-time pace; caption lag, WER, server memory.

    python bench/load_client.py --url ws://127.0.0.1:8000/asr --streams 4 \
        --audio speech.wav --reference "the words spoken"

Audio is sent as PCM s16le 16 kHz (`?format=pcm`), in `--chunk-ms` pieces at
real-time pace. Caption lag is measured per committed word: the wall time at
which it first appears in `lines`, minus the wall time at which the end of its
line's audio was sent.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.metrics import percentile, wer  # noqa: E402


def load_pcm16k(path: str) -> bytes:
    """Any audio file → 16 kHz mono s16le bytes (a WAV already in that form is read directly, else ffmpeg)."""
    try:
        with wave.open(path) as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2):
                return w.readframes(w.getnframes())
    except (wave.Error, EOFError):
        pass
    out = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-i", path, "-f", "s16le", "-ac", "1", "-ar", "16000", "-"],
        check=True, capture_output=True,
    )
    return out.stdout


def line_end_seconds(line: dict) -> float:
    """A line's end in seconds: our `end_s`, or WhisperLiveKit's `end` ("H:MM:SS" or "H:MM:SS.ss")."""
    if "end_s" in line:
        return float(line["end_s"])
    seconds = 0.0
    for part in str(line["end"]).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


@dataclass
class StreamResult:
    gpu_id: int | None = None
    text: str = ""
    lags: list[float] = field(default_factory=list)
    error: str | None = None
    updates: int = 0


class ServerError(Exception):
    """The server's `error` message on the stream (its text)."""


async def send_realtime(ws, pcm: bytes, chunk_ms: int, t0: float, pace: float = 1.0) -> None:
    """PCM in `chunk_ms` pieces at `pace` x real time from `t0`, then the end-of-stream frame."""
    step = 16000 * 2 * chunk_ms // 1000
    for i, off in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, t0 + i * chunk_ms / 1000 / pace - time.monotonic()))
        await ws.send(pcm[off:off + step])
    await ws.send(b"")


async def caption_updates(ws) -> AsyncIterator[dict]:
    """The stream's caption updates until `ready_to_stop`; an error message raises ServerError."""
    async for raw in ws:
        msg = json.loads(raw)
        if msg.get("type") == "error":
            raise ServerError(msg["error"])
        if msg.get("type") == "ready_to_stop":
            return
        if "lines" in msg:
            yield msg


async def run_stream(url: str, pcm: bytes, chunk_ms: int, start_delay: float) -> StreamResult:
    result = StreamResult()
    await asyncio.sleep(start_delay)
    sep = "&" if "?" in url else "?"
    try:
        async with websockets.connect(f"{url}{sep}format=pcm", max_size=None, open_timeout=60) as ws:
            config = json.loads(await ws.recv())
            result.gpu_id = config.get("gpu_id")
            t0 = time.monotonic()
            seen_words = 0
            send_task = asyncio.create_task(send_realtime(ws, pcm, chunk_ms, t0))
            try:
                async for msg in caption_updates(ws):
                    result.updates += 1
                    now = time.monotonic()
                    speech = [ln for ln in msg["lines"] if ln["speaker"] != -2]
                    words = " ".join(ln["text"] for ln in speech).split()
                    if len(words) > seen_words and speech:
                        audio_end = line_end_seconds(speech[-1])
                        sent_at = t0 + min(audio_end, len(pcm) / 32000)
                        result.lags.extend([now - sent_at] * (len(words) - seen_words))
                        seen_words = len(words)
                    result.text = " ".join(ln["text"] for ln in speech)
            except ServerError as exc:
                result.error = str(exc)
            await send_task
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it doesn't crash
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def run(url: str, pcm: bytes, streams: int, chunk_ms: int, stagger: float) -> list[StreamResult]:
    return await asyncio.gather(*(run_stream(url, pcm, chunk_ms, i * stagger) for i in range(streams)))


def server_memory(url: str) -> str:
    base = url.replace("ws://", "http://").replace("wss://", "https://").rsplit("/asr", 1)[0]
    try:
        status = httpx.get(f"{base}/gpu-status", timeout=5).json()
        status["gpus"]
    except Exception as exc:  # noqa: BLE001 - e.g. a server without /gpu-status (WhisperLiveKit)
        return f"unavailable ({type(exc).__name__})"
    return ", ".join(f"GPU {g['gpu_id']}: {g['allocated_memory_gb']:.2f}/{g['total_memory_gb']:.2f} GB"
                     for g in status["gpus"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/asr")
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--audio", required=True)
    ap.add_argument("--reference", default="", help="reference text (or @file)")
    ap.add_argument("--chunk-ms", type=int, default=100)
    ap.add_argument("--stagger", type=float, default=0.25, help="seconds between stream starts")
    ap.add_argument("--no-warmup", action="store_true",
                    help="measure the first streams too (they pay for the lazy model load)")
    args = ap.parse_args()
    reference = Path(args.reference[1:]).read_text() if args.reference.startswith("@") else args.reference
    pcm = load_pcm16k(args.audio)
    if not args.no_warmup:  # the same streams with 2 s of audio, so every device they land on has loaded
        asyncio.run(run(args.url, pcm[: 2 * 32000], args.streams, args.chunk_ms, 0.0))
    results = asyncio.run(run(args.url, pcm, args.streams, args.chunk_ms, args.stagger))
    memory = server_memory(args.url)
    lags = [x for r in results for x in r.lags]
    wers = [wer(reference, r.text) for r in results if reference and not r.error]
    errors = [r.error for r in results if r.error]
    print(f"streams={args.streams} audio={len(pcm) / 32000:.1f}s chunk={args.chunk_ms}ms")
    print(f"caption lag: p50 {percentile(lags, .5):.2f} s  p95 {percentile(lags, .95):.2f} s  (n={len(lags)} words)")
    if wers:
        print(f"WER: mean {np.mean(wers):.3f}  worst {max(wers):.3f}")
    print("per-stream p95 lag: " + " ".join(f"{percentile(r.lags, .95):.2f}" for r in results))
    print(f"devices: {sorted({r.gpu_id for r in results if r.gpu_id is not None})}  errors: {len(errors)} {errors[:3]}")
    print(f"server memory after: {memory}")
    if results and results[0].text:
        print(f"stream 0 text: {results[0].text}")


if __name__ == "__main__":
    main()
