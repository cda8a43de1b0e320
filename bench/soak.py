"""Soak: live streams of real speech at real-time pace for many minutes; memory, traffic, lag and WER
over the session, minute by minute.

    HF_HUB_OFFLINE=1 python bench/soak.py --minutes 60 --streams 2 [--updates incremental|full]

Starts a server on its defaults (plus `--pcm-input` and a free port; `--server-arg` adds flags), or
uses `--url` (then memory and CPU come from its `/gpu-status`, not its process). Each stream plays the
recordings of `../shared/speech` that have a reference transcript, one after another (1 s apart, 3 s
between passes), over and over, in 100-ms frames at real-time pace; stream i starts its passes at a
different recording so that streams are not in step. The client is the page's: `?updates=incremental`
(the lines that changed), rebuilt into whole captions.

Per wall minute: the server's RSS and CPU seconds per audio second (its own process times), the
bytes the server sent per audio second, and the caption lag (per committed word: when it first
appears in `lines`, minus when the end of its line's audio was sent). Per pass of the recordings:
WER (openai-whisper's `EnglishTextNormalizer` both sides) against the references, beside offline
openai-whisper `transcribe` of the same recordings with the same weights (`--offline`). The summary
holds each figure against the goal of issue 29, after the first 5 minutes (warm-up): RSS growth at most
20 MB per stream, bytes per audio second of the last quarter at most 1.5x the first's, every minute's
lag p95 at most 3.5 s, every pass's WER within 3 points of the first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.accuracy import start_server  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.speech_set import DEFAULT_SET, Clip, load_clips, wer  # noqa: E402

FRAME_MS = 100
BYTES_PER_SECOND = 32000
CLIP_GAP_SECONDS = 1.0
PASS_GAP_SECONDS = 3.0


@dataclass
class Pass:
    """One pass of the recordings in a stream: where it lies in stream time, and what was said."""

    start: float
    end: float
    reference: str
    clips: list[tuple[str, float, float, str]] = field(default_factory=list)  # (name, start, end, reference)


@dataclass
class StreamLog:
    passes: list[Pass] = field(default_factory=list)
    lines: list[dict] = field(default_factory=list)
    lags: list[tuple[float, float]] = field(default_factory=list)  # (wall time, lag)
    received: list[tuple[float, int]] = field(default_factory=list)  # (wall time, bytes of a text frame)
    sent_audio: float = 0.0  # seconds of audio sent
    error: str | None = None


def silence(seconds: float) -> bytes:
    return bytes(int(seconds * 16000) * 2)


def stream_audio(clips: list[Clip], first: int, seconds: float) -> tuple[bytes, list[Pass]]:
    """Passes of the recordings (starting at clip `first`) until `seconds` of audio."""
    order = clips[first:] + clips[:first]
    chunks: list[bytes] = []
    passes: list[Pass] = []
    at = 0.0
    while at < seconds:
        start = at
        spans = []
        for clip in order:
            pcm = clip.pcm16()
            chunks += [pcm, silence(CLIP_GAP_SECONDS)]
            spans.append((clip.name, at, at + len(pcm) / BYTES_PER_SECOND + CLIP_GAP_SECONDS, clip.reference))
            at += len(pcm) / BYTES_PER_SECOND + CLIP_GAP_SECONDS
        chunks.append(silence(PASS_GAP_SECONDS))
        passes.append(Pass(start, at, " ".join(c.reference for c in order), spans))
        at += PASS_GAP_SECONDS
    return b"".join(chunks)[: int(seconds * 16000) * 2], passes


def apply(lines: list[dict], update: dict) -> list[dict]:
    """The captions after an update, whole or incremental."""
    if "from_line" not in update:
        return update["lines"]
    return lines[: update["from_line"]] + update["lines"]


def speech_words(lines: list[dict]) -> int:
    return sum(len(line["text"].split()) for line in lines if line["speaker"] != -2)


async def run_stream(url: str, pcm: bytes, log: StreamLog, updates: str, start_delay: float) -> None:
    await asyncio.sleep(start_delay)
    try:
        async with websockets.connect(f"{url}?format=pcm&updates={updates}", max_size=None,
                                      open_timeout=60) as ws:
            await ws.recv()  # config
            t0 = time.monotonic()
            step = BYTES_PER_SECOND * FRAME_MS // 1000

            async def send() -> None:
                for i, off in enumerate(range(0, len(pcm), step)):
                    await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 - time.monotonic()))
                    await ws.send(pcm[off:off + step])
                    log.sent_audio = (off + step) / BYTES_PER_SECOND
                await ws.send(b"")

            sender = asyncio.create_task(send())
            seen = 0
            async for raw in ws:
                now = time.monotonic()
                log.received.append((now, len(raw)))
                msg = json.loads(raw)
                if msg.get("type") == "error":
                    log.error = msg["error"]
                    break
                if "lines" not in msg:
                    continue
                log.lines = apply(log.lines, msg)
                words = speech_words(log.lines)
                speech = [ln for ln in log.lines if ln["speaker"] != -2]
                if words > seen and speech:
                    sent_at = t0 + min(float(speech[-1]["end_s"]), len(pcm) / BYTES_PER_SECOND)
                    log.lags += [(now, now - sent_at)] * (words - seen)
                seen = words
            sender.cancel()
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it doesn't crash
        log.error = f"{type(exc).__name__}: {exc}"


def process_figures(pid: int | None, base: str) -> tuple[float, float]:
    """(RSS in MB, CPU seconds) of the server process; from /gpu-status (RSS only) without a pid."""
    if pid is None:
        gpus = httpx.get(f"http://{base}/gpu-status", timeout=10).json()["gpus"]
        return sum(g["allocated_memory_gb"] for g in gpus) * 1024, float("nan")
    with open(f"/proc/{pid}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss_kb / 1024, (int(fields[11]) + int(fields[12])) / ticks


async def sample(pid: int | None, base: str, seconds: float, out: list[tuple[float, float, float]],
                 logs: list[StreamLog]) -> None:
    """(wall time, RSS MB, CPU s) every 10 s; a progress line every minute."""
    start = time.monotonic()
    end = start + seconds
    while time.monotonic() < end + 5:
        out.append((time.monotonic(), *process_figures(pid, base)))
        if len(out) % 6 == 1:
            recent = [lag for log in logs for t, lag in log.lags if t > time.monotonic() - 60]
            print(f"[{(time.monotonic() - start) / 60:5.1f} min] RSS {out[-1][1]:.0f} MB, words last minute "
                  f"{len(recent)}, lag p95 {percentile(recent, 0.95) if recent else float('nan'):.2f} s", flush=True)
        await asyncio.sleep(10)


def pass_text(lines: list[dict], p: Pass) -> str:
    return " ".join(ln["text"] for ln in lines if ln["speaker"] != -2 and p.start <= float(ln["start_s"]) < p.end)


async def soak(url: str, base: str, pid: int | None, clips: list[Clip], args: argparse.Namespace):
    seconds = args.minutes * 60
    logs = []
    tasks = []
    for i in range(args.streams):
        pcm, passes = stream_audio(clips, i * len(clips) // args.streams, seconds)
        logs.append(StreamLog(passes=passes))
        tasks.append(run_stream(url, pcm, logs[-1], args.updates, 0.5 * i))
    samples: list[tuple[float, float, float]] = []
    t0 = time.monotonic()
    await asyncio.gather(sample(pid, base, seconds, samples, logs), *tasks)
    return t0, logs, samples


def at_minute(samples: list[tuple[float, float, float]], t: float) -> tuple[float, float]:
    """RSS and CPU at the sample nearest wall time `t`."""
    best = min(samples, key=lambda s: abs(s[0] - t))
    return best[1], best[2]


def report(t0: float, logs: list[StreamLog], samples, args: argparse.Namespace, offline: float | None) -> dict:
    minutes = int(args.minutes)
    rows = []
    print(f"\n{args.streams} stream(s), {args.minutes:g} min, updates={args.updates}")
    print("minute  RSS MB  CPU s/audio s  KB sent/audio s  lag p50  lag p95  words")
    for m in range(minutes):
        lo, hi = t0 + 60 * m, t0 + 60 * (m + 1)
        rss_lo, cpu_lo = at_minute(samples, lo)
        rss, cpu = at_minute(samples, hi)
        lags = [lag for log in logs for t, lag in log.lags if lo <= t < hi]
        sent = sum(n for log in logs for t, n in log.received if lo <= t < hi)
        audio = 60.0 * len(logs)
        row = {"minute": m + 1, "rss_mb": rss, "cpu_per_audio_s": (cpu - cpu_lo) / audio,
               "bytes_per_audio_s": sent / audio, "lag_p50": percentile(lags, 0.5) if lags else float("nan"),
               "lag_p95": percentile(lags, 0.95) if lags else float("nan"), "words": len(lags)}
        rows.append(row)
        print(f"{m + 1:6d}  {rss:6.0f}  {row['cpu_per_audio_s']:13.2f}  {row['bytes_per_audio_s'] / 1000:15.2f}"
              f"  {row['lag_p50']:7.2f}  {row['lag_p95']:7.2f}  {row['words']:5d}")
    wers = []
    clip_texts: list[list[dict[str, str]]] = []  # per stream, per pass: each recording's captions
    for i, log in enumerate(logs):
        done = [p for p in log.passes if p.end <= log.sent_audio]
        per_pass = [wer(p.reference, pass_text(log.lines, p)) for p in done]
        wers.append(per_pass)
        print(f"stream {i}: WER per pass " + " ".join(f"{100 * w:.1f}" for w in per_pass)
              + (f"  error: {log.error}" if log.error else ""))
        clip_texts.append([{name: pass_text(log.lines, Pass(a, b, ref)) for name, a, b, ref in p.clips} for p in done])
        # Where the pass furthest from the first differs from it, by the recording each caption line
        # starts in (a line runs on into the next recording when the 1-s gap does not end the utterance).
        if len(per_pass) > 1:
            far = max(range(1, len(per_pass)), key=lambda k: abs(per_pass[k] - per_pass[0]))
            for name, _, _, ref in done[0].clips:
                a, b = clip_texts[-1][0][name], clip_texts[-1][far][name]
                if a != b:
                    print(f"    {name}: pass 1 {100 * wer(ref, a):.0f} % / pass {far + 1} {100 * wer(ref, b):.0f} %"
                          f"\n      1: {a}\n      {far + 1}: {b}")
    if offline is not None:
        print(f"offline openai-whisper transcribe, same recordings and weights: WER {100 * offline:.1f} % (pooled)")

    after = [r for r in rows if r["minute"] > 5]
    growth = (after[-1]["rss_mb"] - rows[4]["rss_mb"]) / len(logs) if after else float("nan")
    quarter = max(1, len(rows) // 4)
    first_q = np.mean([r["bytes_per_audio_s"] for r in rows[:quarter]])
    last_q = np.mean([r["bytes_per_audio_s"] for r in rows[-quarter:]])
    worst_lag = max((r["lag_p95"] for r in after if r["words"]), default=float("nan"))
    wer_drift = max((abs(w - ws[0]) for ws in wers if ws for w in ws), default=float("nan"))
    checks = {
        "RSS growth after minute 5, MB per stream (<= 20)": (growth, growth <= 20),
        "bytes per audio s, last quarter / first (<= 1.5)": (last_q / first_q, last_q / first_q <= 1.5),
        "caption lag p95, worst minute after minute 5, s (<= 3.5)": (worst_lag, worst_lag <= 3.5),
        "WER of a pass minus the first's, worst, points (<= 3)": (100 * wer_drift, 100 * wer_drift <= 3),
        "stream errors (0)": (sum(1 for log in logs if log.error), not any(log.error for log in logs)),
    }
    print("\nagainst issue 29's goals:")
    for name, (value, ok) in checks.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {value:.2f}")
    return {"rows": rows, "wer_per_pass": wers, "clip_texts": clip_texts, "offline_wer": offline,
            "checks": {k: [float(v), bool(ok)] for k, (v, ok) in checks.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--updates", choices=("incremental", "full"), default="incremental")
    ap.add_argument("--url", help="an /asr URL of a running server (default: start one)")
    ap.add_argument("--server-arg", action="append", default=[], help="a flag for the server this starts")
    ap.add_argument("--speech", default=str(DEFAULT_SET))
    ap.add_argument("--offline", action="store_true", help="also score offline openai-whisper on the recordings")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    clips = load_clips(Path(args.speech))
    offline = None
    if args.offline:
        from bench.accuracy import offline_texts
        from bench.speech_set import pooled_wer

        texts = offline_texts("tiny.en", clips)
        offline = pooled_wer([(c.reference, texts[c.name]) for c in clips])
    proc = None
    if args.url:
        url, base, pid = args.url, args.url.split("//", 1)[1].split("/", 1)[0], None
    else:
        proc, base = start_server(args.server_arg, tempfile.mkdtemp(prefix="soak-"))
        url, pid = f"ws://{base}/asr", proc.pid
    try:
        t0, logs, samples = asyncio.run(soak(url, base, pid, clips, args))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    figures = report(t0, logs, samples, args, offline)
    if args.out:
        Path(args.out).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
