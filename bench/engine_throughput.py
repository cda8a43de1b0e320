"""How many streams one device's batched Whisper can keep up with: round time and memory per stream.

    python bench/engine_throughput.py --model small --random --streams 1,32,64,128,256 [--device cuda]

Runs the server's `BatchedWhisper` in-process (no sockets) on rounds shaped like
LocalAgreement's live load: every stream has an audio buffer of a different
length (spread over 1..`--max-buffer` seconds, as buffers grow and get trimmed)
and decodes `--tokens-per-second` tokens per second of buffer (English speech
runs at about 3-4 Whisper tokens a second; LocalAgreement re-decodes the whole
buffer each update). With `--random`, the model has random weights of the named
architecture, and the decoder is forced to that token count (random weights
never say end-of-text); with real weights the count is what the model decodes.

A device holds N real-time streams when a round over all N takes less than the
update interval (1 s of new audio per stream per round): then every stream is
served once a second and the caption lag stays near what one stream sees.
Prints per N: round time, encoder / decoder share, decoder step time, and the
device memory each stream takes beyond the shared weights in a steady round (the
decoder's preallocated buffers and the round's peak working memory, divided by N).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from backends.asr_types import TranscribeJob  # noqa: E402
from backends.batched_whisper import BatchedWhisper  # noqa: E402
from streamserver.config import ServerConfig  # noqa: E402


def load_model(args: argparse.Namespace) -> torch.nn.Module:
    if args.random:
        from tests.random_whisper import random_model

        torch.manual_seed(0)
        model = random_model(args.model)
        import whisper

        if args.model in whisper._ALIGNMENT_HEADS:  # the real model's alignment heads (their count sets the cost)
            model.set_alignment_heads(whisper._ALIGNMENT_HEADS[args.model])
        return model.to(args.device)
    from backends.whisper_loader import load_whisper

    return load_whisper(args.model, args.device)


def buffers(n: int, max_buffer: float, rng: np.random.Generator) -> list[np.ndarray]:
    """n buffers of lengths spread evenly over 1..max_buffer seconds, with speech-like noise."""
    lengths = np.linspace(1.0, max_buffer, n) if n > 1 else np.array([max_buffer / 2])
    return [(0.05 * rng.standard_normal(int(s * 16000))).astype(np.float32) for s in lengths]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny.en")
    ap.add_argument("--random", action="store_true", help="random weights of --model's architecture")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", default="1,2,4,8")
    ap.add_argument("--max-buffer", type=float, default=12.0)
    ap.add_argument("--tokens-per-second", type=float, default=4.0)
    # The server's defaults: 30-s windows (0), 32 streams per batched call.
    ap.add_argument("--bucket-seconds", type=float, default=ServerConfig.bucket_seconds)
    ap.add_argument("--max-batch", type=int, default=ServerConfig.max_batch)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-graphs", action="store_true", help="run the decoder step eagerly on CUDA too")
    args = ap.parse_args()

    model = load_model(args)
    engine = BatchedWhisper(model, "en", args.model, bucket_seconds=args.bucket_seconds, max_batch=args.max_batch,
                            cuda_graphs=False if args.no_graphs else None)
    if args.random:
        engine.force_tokens_per_second = args.tokens_per_second
    engine.max_tokens_per_second = args.tokens_per_second
    rng = np.random.default_rng(0)
    cuda = args.device.startswith("cuda")
    weights = torch.cuda.memory_allocated() if cuda else 0
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name}  model={args.model}{' (random weights)' if args.random else ''}  dtype={engine.dtype}  "
          f"graphs={engine._graphs}  buffers 1..{args.max_buffer:.0f}s  {args.tokens_per_second:g} tok/s  bucket {args.bucket_seconds:g}s")
    print(f"{'N':>5} {'round':>8} {'encoder':>8} {'decoder':>8} {'steps':>6} {'ms/step':>8} "
          f"{'audio s/s':>10} {'MB/stream':>10}  real-time")
    engine.transcribe_batch([TranscribeJob(b) for b in buffers(2, 3.0, rng)])  # warm-up
    for n in [int(x) for x in args.streams.split(",")]:
        jobs = [TranscribeJob(b) for b in buffers(n, args.max_buffer, rng)]
        for k in range(0, n, args.max_batch):  # first round at this size: buffers grow, graphs are captured
            engine.transcribe_batch(jobs[k:k + args.max_batch])
        if cuda:
            sync(args.device)
            torch.cuda.reset_peak_memory_stats()
        best = None
        for _ in range(args.repeats):
            sync(args.device)
            t0 = time.perf_counter()
            for k in range(0, n, args.max_batch):
                engine.transcribe_batch(jobs[k:k + args.max_batch])
            sync(args.device)
            total = time.perf_counter() - t0
            best = total if best is None else min(best, total)
        enc = None
        for _ in range(2):
            t0 = time.perf_counter()
            for k in range(0, n, args.max_batch):
                engine.encode([j.audio for j in jobs[k:k + args.max_batch]])
            sync(args.device)
            enc = min(enc or 1e9, time.perf_counter() - t0)
        steps = engine.last_steps
        per_stream = (torch.cuda.max_memory_allocated() - weights) / n / 2**20 if cuda else float("nan")
        audio = sum(len(j.audio) for j in jobs) / 16000
        print(f"{n:>5} {best:>7.3f}s {enc:>7.3f}s {best - enc:>7.3f}s {steps:>6} {(best - enc) / max(steps, 1) * 1e3:>7.1f} "
              f"{audio / best:>10.0f} {per_stream:>10.1f}  {'yes' if best < 1.0 else 'no'}")


if __name__ == "__main__":
    main()
