"""Accuracy on real speech: live captions and the file endpoint beside offline Whisper, same model.

    python bench/accuracy.py                          # every clip of ../shared/speech, both policies
    python bench/accuracy.py --policies alignatt --clips read_cmu_goforward,telephone_osr_us_000_0034_8k
    python bench/accuracy.py --url ws://127.0.0.1:8000/asr --policies running   # a server already up

For every clip with a reference transcript: stream it through the server's `/asr` at real-time
pace as PCM (one server per policy, default flags, started here unless `--url`), post it to
`/v1/audio/transcriptions`, and transcribe it with openai-whisper's own `transcribe` (its default
options) with the same weights, in this process. Prints per clip and pooled WER side by side
(openai-whisper's `EnglishTextNormalizer` on both sides) and counts the failures a reader sees:
repeated committed runs, committed times going backwards, lost endings, changed committed lines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import websockets

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load_client import ServerError, caption_updates, send_realtime  # noqa: E402
from bench.speech_set import (  # noqa: E402
    DEFAULT_SET, Clip, LinesCheck, edit_counts, load_clips, lost_ending, new_repeats)


@dataclass
class LiveResult:
    text: str = ""
    lines: list[dict] = field(default_factory=list)  # the final update's lines
    error: str | None = None
    updates: int = 0
    check: LinesCheck = field(default_factory=LinesCheck)
    seconds: float = 0.0


def caption_text(lines: list[dict]) -> str:
    return " ".join(ln["text"].strip() for ln in lines if ln.get("speaker") != -2 and ln.get("text", "").strip())


async def stream_clip(url: str, pcm: bytes, chunk_ms: int = 100, pace: float = 1.0) -> LiveResult:
    """One clip through `/asr` as PCM at `pace` x real time; every update's lines are checked."""
    result = LiveResult()
    sep = "&" if "?" in url else "?"
    t_start = time.monotonic()
    try:
        async with websockets.connect(f"{url}{sep}format=pcm", max_size=None, open_timeout=120) as ws:
            config = json.loads(await ws.recv())
            if config.get("type") == "error":
                result.error = config.get("error")
                return result
            send_task = asyncio.create_task(send_realtime(ws, pcm, chunk_ms, time.monotonic(), pace))
            last: list[dict] = []
            try:
                async for msg in caption_updates(ws):
                    result.updates += 1
                    last = msg["lines"]
                    result.check.update(last)
            except ServerError as exc:
                result.error = str(exc)
            result.check.finish(last)
            result.text, result.lines = caption_text(last), last
            await send_task
    except Exception as exc:  # noqa: BLE001 - a benchmark reports, it doesn't crash
        result.error = f"{type(exc).__name__}: {exc}"
    result.seconds = time.monotonic() - t_start
    return result


async def stream_all(url: str, clips: list[Clip], concurrency: int, pace: float) -> dict[str, LiveResult]:
    gate = asyncio.Semaphore(concurrency)

    async def one(clip: Clip) -> tuple[str, LiveResult]:
        async with gate:
            return clip.name, await stream_clip(url, clip.pcm16(), pace=pace)

    # Longest first, so the long clips do not leave the run waiting on them alone at the end.
    order = sorted(clips, key=lambda c: -c.seconds)
    return dict(await asyncio.gather(*(one(c) for c in order)))


def post_file_to(base: str, clip: Clip) -> str:
    """The clip through `/v1/audio/transcriptions` (the OpenAI-compatible file endpoint): its text."""
    with open(clip.path, "rb") as f:
        r = httpx.post(f"http://{base}/v1/audio/transcriptions", files={"file": (clip.path.name, f, "audio/wav")},
                       data={"model": "whisper-1", "response_format": "json"}, timeout=600)
    r.raise_for_status()
    return r.json()["text"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(extra: list[str], workdir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [sys.executable, "-m", "streamserver", "--pcm-input", "--port", str(port),
            "--jobs-db", os.path.join(workdir, f"jobs-{port}.sqlite"), "--log-level", "warning", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.poll() is not None else ''}")
        time.sleep(0.2)
    httpx.post(f"http://{base}/models/load?gpu=0", timeout=300)  # the first clip does not pay the load
    return proc, base


def offline_texts(model_name: str, clips: list[Clip]) -> dict[str, str]:
    """openai-whisper's `transcribe` with its default options, on the same weights the server loads."""
    import torch
    from backends.whisper_loader import load_whisper, is_english_only

    model = load_whisper(model_name, "cuda" if torch.cuda.is_available() else "cpu")
    language = "en" if is_english_only(model_name) else None
    return {c.name: model.transcribe(c.audio(), language=language, fp16=torch.cuda.is_available())["text"]
            for c in clips}


def score(reference: str, text: str) -> tuple[int, int, int, bool]:
    edits, n = edit_counts(reference, text)
    return edits, n, new_repeats(reference, text), lost_ending(reference, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default=str(DEFAULT_SET), help="folder with manifest.tsv and the WAVs")
    ap.add_argument("--clips", default="", help="comma-separated clip names (default: all with a transcript)")
    ap.add_argument("--policies", default="localagreement,alignatt",
                    help="servers to start, one per policy ('running' with --url: the server given)")
    ap.add_argument("--url", default="", help="a running server's /asr URL instead of starting one")
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--server-args", default="", help="extra flags for the servers started here")
    ap.add_argument("--concurrency", type=int, default=2, help="clips streamed at once")
    ap.add_argument("--pace", type=float, default=1.0, help="1.0 = real time")
    args = ap.parse_args()

    clips = load_clips(Path(args.set), [c for c in args.clips.split(",") if c] or None)
    print(f"{len(clips)} clips, {sum(c.seconds for c in clips):.0f} s of speech, model {args.model}", flush=True)
    columns: dict[str, dict[str, tuple]] = {}
    failures: dict[str, dict[str, int]] = {}
    t = time.monotonic()
    offline = offline_texts(args.model, clips)
    columns["offline"] = {c.name: score(c.reference, offline[c.name]) for c in clips}
    print(f"offline openai-whisper transcribe: {time.monotonic() - t:.0f} s", flush=True)
    with tempfile.TemporaryDirectory() as workdir:
        for policy in args.policies.split(","):
            proc = None
            if args.url:
                url, base = args.url, args.url.split("://", 1)[1].rsplit("/asr", 1)[0]
            else:
                extra = ["--model", args.model, "--policy", policy, *args.server_args.split()]
                proc, base = start_server(extra, workdir)
                url = f"ws://{base}/asr"
            try:
                t = time.monotonic()
                live = asyncio.run(stream_all(url, clips, args.concurrency, args.pace))
                print(f"live {policy}: {time.monotonic() - t:.0f} s", flush=True)
                columns[f"live {policy}"] = {c.name: score(c.reference, live[c.name].text) for c in clips}
                failures[f"live {policy}"] = {
                    "errors": sum(1 for r in live.values() if r.error),
                    "changed lines": sum(r.check.changed for r in live.values()),
                    "jumps back": sum(r.check.backwards for r in live.values()),
                }
                for c in clips:
                    r = live[c.name]
                    if r.error:
                        print(f"  {c.name}: error {r.error}")
                    if r.check.changed:
                        before, after = r.check.first_change
                        print(f"  {c.name}: committed text changed in {r.check.changed} updates; first: "
                              f"{before[-2:]!r} -> {after[len(before) - 2:len(before) + 1]!r}")
                    if r.check.backwards:
                        print(f"  {c.name}: committed times went back {r.check.backwards} times")
                if policy == args.policies.split(",")[0]:
                    t = time.monotonic()
                    files = {c.name: post_file_to(base, c) for c in clips}
                    print(f"file endpoint: {time.monotonic() - t:.0f} s", flush=True)
                    columns["file endpoint"] = {c.name: score(c.reference, files[c.name]) for c in clips}
                if os.environ.get("ACCURACY_VERBOSE"):
                    for c in clips:
                        print(f"  [{policy}] {c.name}: {live[c.name].text}")
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)
    report(clips, columns, failures)


def report(clips: list[Clip], columns: dict[str, dict[str, tuple]], failures: dict[str, dict[str, int]]) -> None:
    names = list(columns)
    print()
    print(f"{'clip':44s} {'s':>6s} " + " ".join(f"{n:>22s}" for n in names))
    for c in clips:
        cells = []
        for n in names:
            e, k, rep, lost = columns[n][c.name]
            flags = ("R" if rep else "") + ("L" if lost else "")
            cells.append(f"{100 * e / max(k, 1):6.1f}% {flags:>3s}")
        print(f"{c.name:44s} {c.seconds:6.1f} " + " ".join(f"{x:>22s}" for x in cells))
    print()
    print(f"{'pooled WER':44s} {'':6s} " + " ".join(
        f"{100 * sum(v[0] for v in columns[n].values()) / max(1, sum(v[1] for v in columns[n].values())):21.1f}%"
        for n in names))
    print(f"{'repeated committed runs (R)':44s} {'':6s} " + " ".join(
        f"{sum(v[2] for v in columns[n].values()):22d}" for n in names))
    print(f"{'lost endings (L)':44s} {'':6s} " + " ".join(
        f"{sum(1 for v in columns[n].values() if v[3]):22d}" for n in names))
    for key in ("jumps back", "changed lines", "errors"):
        print(f"{key:44s} {'':6s} " + " ".join(
            f"{failures[n][key] if n in failures else '-':>22}" for n in names))


if __name__ == "__main__":
    main()
