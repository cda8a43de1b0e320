"""What one live stream costs, and where its CPU goes: N real-time streams of real speech through a server.

    HF_HUB_OFFLINE=1 python bench/stream_cost.py --streams 1,4 --minutes 4 [--server-arg=--policy=alignatt]

For each stream count: starts a server on its defaults (plus `--pcm-input`, a free port and each
`--server-arg`), plays the recordings of `../shared/speech` in N streams at real-time pace (the soak's
client: 100-ms frames, each stream starting at a different recording), and after a warm-up reads the
server process's CPU time (`/proc/<pid>/stat`, all threads) and its `/metrics`
`streamserver_compute_cpu_seconds_total` by stage at the start and at the end of the measured span.
Prints, per audio second of one stream: the process's CPU, its share in the Whisper encoder, the
decoder, the free decode that checks each utterance's ending, the VAD, the diarizer (with
`--server-arg=--diarization`), and everything else (the event loop, audio decoding, JSON, Python);
and the caption lag over the span (per committed word, as the soak measures it).

A stage's CPU is the process's CPU time while the device's worker ran that stage's model call, so
work the event loop did meanwhile on the other core counts there too; "other" is what is left.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.accuracy import start_server  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.soak import StreamLog, process_figures, run_stream, stream_audio  # noqa: E402
from bench.speech_set import DEFAULT_SET, load_clips  # noqa: E402
from streamserver.ops.metrics import CPU_STAGES  # noqa: E402

COLUMNS = ("encoder", "decoder", "ending_check", "vad", "diarization")


def stage_cpu(base: str) -> dict[str, float]:
    out = dict.fromkeys(CPU_STAGES, 0.0)
    for family in text_string_to_metric_families(httpx.get(f"http://{base}/metrics", timeout=10).text):
        for s in family.samples:
            if s.name == "streamserver_compute_cpu_seconds_total":
                out[s.labels["stage"]] += s.value
    return out


async def measure(url: str, base: str, pid: int, clips, streams: int, warmup: float, seconds: float) -> dict:
    logs = [StreamLog() for _ in range(streams)]
    tasks = [asyncio.create_task(run_stream(url, stream_audio(clips, i * len(clips) // streams, warmup + seconds + 5)[0],
                                            logs[i], "incremental", 0.2 * i)) for i in range(streams)]
    await asyncio.sleep(warmup)
    t0, (_, cpu0), stages0 = time.monotonic(), process_figures(pid, base), stage_cpu(base)
    audio0 = sum(log.sent_audio for log in logs)
    await asyncio.sleep(seconds)
    t1, (_, cpu1), stages1 = time.monotonic(), process_figures(pid, base), stage_cpu(base)
    audio = sum(log.sent_audio for log in logs) - audio0
    await asyncio.gather(*tasks)
    lags = [lag for log in logs for t, lag in log.lags if t0 <= t <= t1]
    spent = {k: stages1[k] - stages0[k] for k in CPU_STAGES}
    return {"streams": streams, "audio_s": audio, "cpu": cpu1 - cpu0, "stages": spent,
            "lag_p50": percentile(lags, 0.5) if lags else float("nan"),
            "lag_p95": percentile(lags, 0.95) if lags else float("nan"),
            "errors": [log.error for log in logs if log.error]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,4", help="stream counts to measure, comma-separated")
    ap.add_argument("--minutes", type=float, default=4.0, help="measured span per stream count")
    ap.add_argument("--warmup", type=float, default=30.0, help="seconds streamed before the span")
    ap.add_argument("--server-arg", action="append", default=[], help="a flag for the servers this starts")
    ap.add_argument("--speech", default=str(DEFAULT_SET))
    args = ap.parse_args()
    clips = load_clips(Path(args.speech))
    rows = []
    for n in (int(x) for x in args.streams.split(",")):
        proc, base = start_server(args.server_arg, tempfile.mkdtemp(prefix="cost-"))
        try:
            rows.append(asyncio.run(measure(f"ws://{base}/asr", base, proc.pid, clips, n, args.warmup,
                                            60 * args.minutes)))
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\nCPU seconds per audio second of one stream ({' '.join(args.server_arg) or 'default flags'}; "
          f"{args.minutes:g} min after {args.warmup:g} s)")
    print(f"{'streams':>7} {'total':>6} " + " ".join(f"{c:>12}" for c in COLUMNS) + f" {'other':>6}"
          f" {'lag p50':>7} {'lag p95':>7}")
    for r in rows:
        per = {k: v / r["audio_s"] for k, v in r["stages"].items()}
        total = r["cpu"] / r["audio_s"]
        other = total - sum(per.values())
        print(f"{r['streams']:7d} {total:6.3f} " + " ".join(f"{per[c]:12.3f}" for c in COLUMNS) + f" {other:6.3f}"
              f" {r['lag_p50']:7.2f} {r['lag_p95']:7.2f}" + (f"  errors: {r['errors']}" if r["errors"] else ""))


if __name__ == "__main__":
    main()
