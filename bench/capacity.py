"""Capacity sweep: N = 1, 2, 3, 4, 6, 8, 12, ... concurrent real-time streams against one server URL.

    python bench/capacity.py --url ws://127.0.0.1:8000/asr [--audio CLIP.wav --reference "..."] [--max-streams 16]
    python bench/capacity.py --levels 1,32,64,128,192,256   # coarse steps where a GPU holds hundreds

The audio defaults to the real clip shipped in bench/clips (read speech, LibriSpeech) and its
transcript. For each N it prints caption lag p50/p95, mean WER (openai-whisper's normaliser on
both sides) and the server's memory, and at the end the capacity: the largest N whose p95 lag
stays under --lag-limit (2.0 s), with no stream failing and mean WER within --wer-margin (5
points) of the single-stream WER: a level that keeps up by dropping words does not count. Point --url at any server that speaks the
WhisperLiveKit `/asr` protocol with PCM input (ours, or `whisperlivekit-server
--pcm-input`); bench/compare_capacity.py runs both and prints the ratio.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.load_client import load_pcm16k, run, server_memory  # noqa: E402
from bench.metrics import percentile  # noqa: E402
from bench.speech_set import wer  # noqa: E402

CLIP = Path(__file__).resolve().parent / "clips" / "librispeech_2412-153948-0000.wav"
CLIP_TEXT = ("If the reader will excuse me, I will say nothing of my antecedents, nor of the circumstances "
             "which led me to leave my native country. The narrative would be tedious to him and painful to myself.")


def next_n(n: int) -> int:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, ...: steps of about 1.5x, fine enough to place a capacity."""
    if n < 4:
        return n + 1
    return n * 3 // 2 if n & (n - 1) == 0 else (n // 3) * 4


def sweep(url: str, pcm: bytes, reference: str, max_streams: int, lag_limit: float,
          chunk_ms: int = 100, stagger: float = 0.1, wer_margin: float = 0.05,
          levels: list[int] | None = None) -> int:
    """Print one row per N; return the capacity (0 if even one stream misses the limits).

    ``levels`` replaces the 1.5x steps with given N (the first should be 1: its WER is the
    baseline the others are held to); a lent GPU's short lease cannot afford every step.
    """
    asyncio.run(run(url, pcm[: 2 * 32000], 1, chunk_ms, 0.0))  # the first load is not a stream's lag
    steps = iter(levels[1:]) if levels else None
    capacity, n, single = 0, (levels[0] if levels else 1), None
    print(f"url={url} audio={len(pcm) / 32000:.1f}s lag limit p95 < {lag_limit:.1f}s")
    print(f"{'N':>4} {'p50 lag':>8} {'p95 lag':>8} {'WER':>6} {'errors':>6}  memory", flush=True)
    while n <= max_streams:
        results = asyncio.run(run(url, pcm, n, chunk_ms, stagger))
        lags = [x for r in results for x in r.lags]
        errors = sum(1 for r in results if r.error)
        w = np.mean([wer(reference, r.text) for r in results]) if reference else float("nan")
        p95 = percentile(lags, 0.95)
        print(f"{n:>4} {percentile(lags, 0.5):>7.2f}s {p95:>7.2f}s {w:>6.3f} {errors:>6}  {server_memory(url)}",
              flush=True)
        single = w if single is None else single
        if errors or not lags or p95 >= lag_limit:
            break
        if reference and w > single + wer_margin:
            print(f"     WER {w:.3f} is over the single stream's {single:.3f} + {wer_margin:.2f}", flush=True)
            break
        capacity, n = n, (next(steps, max_streams + 1) if steps is not None else next_n(n))
    print(f"capacity: {capacity} real-time stream(s) at p95 lag < {lag_limit:.1f}s", flush=True)
    return capacity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="ws://127.0.0.1:8000/asr")
    ap.add_argument("--audio", default=str(CLIP))
    ap.add_argument("--reference", default=None, help="reference text (or @file); default: the shipped clip's")
    ap.add_argument("--max-streams", type=int, default=16)
    ap.add_argument("--lag-limit", type=float, default=2.0)
    ap.add_argument("--chunk-ms", type=int, default=100)
    ap.add_argument("--stagger", type=float, default=0.1)
    ap.add_argument("--wer-margin", type=float, default=0.05)
    ap.add_argument("--levels", default=None, help="comma-separated N to run instead of the 1.5x steps, e.g. 1,32,64")
    args = ap.parse_args()
    reference = args.reference if args.reference is not None else (CLIP_TEXT if args.audio == str(CLIP) else "")
    reference = Path(reference[1:]).read_text() if reference.startswith("@") else reference
    sweep(args.url, load_pcm16k(args.audio), reference, args.max_streams, args.lag_limit, args.chunk_ms,
          args.stagger, args.wer_margin, [int(x) for x in args.levels.split(",")] if args.levels else None)


if __name__ == "__main__":
    main()
